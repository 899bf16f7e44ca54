"""Datasets in and out: ``extract`` runs a traced function over a dataset into Arrow rows / Parquet files, and
``to_tensors`` / ``to_tensor`` read the tensor columns back with the dtype and shape recorded in the schema."""

from raysight.data.arrow import tensor_field, tensor_info, to_tensor, to_tensors
from raysight.data.extract import extract

__all__ = ["extract", "tensor_field", "tensor_info", "to_tensor", "to_tensors"]
