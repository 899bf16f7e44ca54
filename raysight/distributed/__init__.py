"""Running graphs on a Ray cluster: model actors (``actor.py``) and the pools that hold them (``pool.py``).
Nothing here imports ray until it is used."""
