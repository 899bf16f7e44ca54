"""LanguageModel: a Hugging Face transformers model with its tokenizer, built lazily on the meta device.

Config and tokenizer load at once; the weights load (through the normal ``from_pretrained`` path, ``device_map``
included) the first time something runs locally, or on ``dispatch()``. Each invoke's input may be a string, a list
of strings, token ids in any shape, or a dict/BatchEncoding. Invokes are left-padded into one batch for causal
LMs and given position ids that follow the attention mask, so a prompt's activations in a padded batch equal those
of the prompt run alone. ``model.generate(...)`` interleaves with HF ``generate``: every module fires once per
step, ``model.generator.output`` is the generated ids and ``model.generator.streamer.output`` each step's tokens.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Callable, Optional, Union

import torch

from raysight.backends.base import InvokeInputs
from raysight.envoy import _ATTACHED, Envoy
from raysight.models.nnsight import NNsight, _backend_for, _check_blocking
from raysight.runtime.hooks import is_hooked
from raysight.tracing.tracer import Tracer

logger = logging.getLogger(__name__)

_MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "token_type_ids", "position_ids")
_PAD_VALUES = {"attention_mask": 0, "labels": -100, "token_type_ids": 0}


class _Generator(torch.nn.Module):
    """Hook points of generation: called with the generated ids at the end, and (streamer) with each step's."""

    def __init__(self) -> None:
        super().__init__()
        self.streamer = _Streamer()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


class _Streamer(torch.nn.Module):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


class _StreamerBridge:
    """An HF streamer that fires the ``generator.streamer`` hook point (and forwards to the user's streamer)."""

    def __init__(self, module: _Streamer, user: Any = None) -> None:
        self._module = module
        self._user = user

    def put(self, value: torch.Tensor) -> None:
        self._module(value)
        if self._user is not None:
            self._user.put(value)

    def end(self) -> None:
        if self._user is not None:
            self._user.end()


class LanguageModel(NNsight):
    """``model = raysight.LanguageModel("path/or/repo", dispatch=False, device_map=None, torch_dtype=None)``."""

    def __init__(
        self,
        model: Union[str, Any, torch.nn.Module],
        *,
        tokenizer: Any = None,
        automodel: Union[str, type] = "AutoModelForCausalLM",
        dispatch: bool = False,
        device_map: Any = None,
        torch_dtype: Any = None,
        rename: Optional[dict[str, str]] = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        import transformers

        auto = getattr(transformers, automodel, None) if isinstance(automodel, str) else automodel
        if auto is None:
            raise ValueError(f"automodel={automodel!r} is not a transformers Auto class (e.g. 'AutoModelForCausalLM')")
        load_kwargs = dict(from_pretrained_kwargs)
        if torch_dtype is not None:
            load_kwargs["dtype"] = _dtype(torch_dtype)
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        if isinstance(model, torch.nn.Module):
            source = getattr(getattr(model, "config", None), "_name_or_path", None) or None  # "" for from_config
            module, loaded = model, True
        else:
            source = str(model)
            config = _load_config(source, from_pretrained_kwargs)
            if dispatch:
                module, loaded = _load_weights(auto, source, load_kwargs), True
            else:
                with torch.device("meta"):
                    module = auto.from_config(config, **({"dtype": load_kwargs["dtype"]} if "dtype" in load_kwargs
                                                          else {}))  # fmt: skip
                module.eval()  # as from_pretrained leaves the model it loads (a remote run uses the client's modes)
                loaded = False
        d = self.__dict__
        d["_source"] = source
        d["_auto"] = auto
        d["_load_kwargs"] = load_kwargs
        d["_dispatched"] = loaded
        d["tokenizer"] = _load_tokenizer(tokenizer, source, _is_causal(module))
        super().__init__(module, rename=rename)
        self._add_generator()

    # -- loading --------------------------------------------------------------------------------------------
    @property
    def dispatched(self) -> bool:
        """True once real weights are loaded (False while the model is only a shape on the meta device)."""
        return self._dispatched

    def dispatch(self) -> "LanguageModel":
        """Load the real weights now (``from_pretrained`` with this model's ``device_map`` and dtype). The envoys
        already handed out stay valid (they now stand for the loaded modules), modules attached before
        (``model.transformer.h[0].sae = SAE()``) are moved onto the loaded model, and the edited copies of this
        model (made before or after) share the loaded weights."""
        origin = self.__dict__.get("_origin", self)
        if not origin._dispatched:
            old = origin._module
            module = _load_weights(origin._auto, origin._source, origin._load_kwargs)
            modes = {name: m.training for name, m in old.named_modules()}
            for name, m in module.named_modules():  # `model.train()` before the weights were loaded still holds
                m.training = modes.get(name, m.training)
            _carry_attached(old, module)
            paths = {id(m): name for name, m in old.named_modules()}
            for model in (origin, *origin.__dict__.get("_copies", ())):
                model._rebind(module, paths)
        return self

    def _rebind(self, module: torch.nn.Module, paths: dict[int, str]) -> None:
        """Point this model's envoys at the modules of ``module`` (``paths``: id of an old module -> its path)."""
        for envoy in self._by_path.values():
            path = paths.get(id(envoy.__dict__["_module"]))
            if path is not None:  # (the generator's envoy stands for no module of the model)
                envoy.__dict__["_module"] = module.get_submodule(path) if path else module
        self.__dict__["_module"] = module
        self.__dict__["_dispatched"] = True

    def __getstate__(self) -> dict:
        """What a pickle or deep copy (a server's copy of the model) keeps: not the link between this model and its
        edited copies, so a copy made elsewhere loads its own weights when it needs them."""
        state = super().__getstate__()
        state.pop("_origin", None)
        state.pop("_copies", None)
        return state

    def _copy(self) -> "LanguageModel":
        """An edited copy has the hook points of generation too (``edited.generator.output``); one made before the
        weights are loaded gets them when this model (or it) loads them."""
        copy = super()._copy()
        copy.__dict__["generator"] = Envoy(self._generator_module, "generator", copy)
        copy.__dict__.pop("_copies", None)
        origin = copy.__dict__.setdefault("_origin", self)
        if not origin._dispatched:
            origin.__dict__.setdefault("_copies", weakref.WeakSet()).add(copy)
        return copy

    def _add_generator(self) -> None:
        generator = _Generator()
        self.__dict__["_generator_module"] = generator
        envoy = Envoy(generator, "generator", self)
        self.__dict__["generator"] = envoy

    def _ensure_dispatched(self) -> None:
        if not self._dispatched:
            logger.info("loading the weights of %s for a local run", self._source)
            self.dispatch()

    @property
    def config(self) -> Any:
        return self._module.config

    # -- tracing entry points -------------------------------------------------------------------------------
    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        """As :meth:`NNsight.trace`; ``model.trace(input_ids=..., attention_mask=...)`` also works as the input."""
        inputs, kwargs = _keyword_input(inputs, kwargs)
        return super().trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, max_new_tokens: int = 1, backend: Any = None, trace: bool = True,
                 **kwargs: Any) -> Any:  # fmt: skip
        """``with model.generate(x, max_new_tokens=N) as tracer:`` — interleave with HF ``generate``. With
        ``trace=False`` it generates at once (persistent edits apply) and returns the generated ids."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int (the number of tokens to add), got "
                             f"{max_new_tokens!r}")  # fmt: skip
        inputs, kwargs = _keyword_input(inputs, kwargs)
        kwargs.pop("debug", None)  # (accepted as by trace: errors always name the user's line)
        _check_blocking(kwargs.pop("blocking", True))
        invoker_kwargs = kwargs.pop("invoker_args", None) or kwargs.pop("invoker_kwargs", None)
        scan, validate = kwargs.pop("scan", False), kwargs.pop("validate", False)
        backend = _backend_for(kwargs.pop("remote", False), backend)
        tracer = Tracer(self, inputs, invoker_kwargs=invoker_kwargs, forward_kwargs={"max_new_tokens": max_new_tokens,
                        **kwargs}, backend=backend, method="generate", scan=scan, validate=validate)  # fmt: skip
        if trace:
            return tracer
        with tracer:
            output = self.generator.output.save()
        return output.value

    # -- extension points -----------------------------------------------------------------------------------
    def _prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[tuple, dict, int]:
        given = {k: kwargs.pop(k) for k in _MODEL_INPUTS if k in kwargs}
        if len(inputs) > 1:
            raise TypeError(f"an invoke takes one input (a string, a list of strings, token ids or a dict), got "
                            f"{len(inputs)}; use one invoke per input or pass a list")  # fmt: skip
        if inputs:
            source = inputs[0]
        elif "input_ids" in given:
            source = given.pop("input_ids")
        else:
            if given or kwargs:
                raise TypeError("an invoke was given keyword arguments but no input; pass the text or input_ids=")
            return (), {}, 0
        encoding = self._encode(source, kwargs)
        for key, value in given.items():
            encoding[key] = _as_ids(value, key)
        return (), encoding, int(encoding["input_ids"].shape[0])

    def _invoker_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """nnsight 0.4's ``(args, kwargs)`` with the encoding as the one positional input:
        ``invoker.inputs[0][0]["input_ids"]``; ``invoker.inputs[0]["input_ids"]`` (older tutorials) works too."""
        return (_Args((kwargs,)), {})

    def _encode(self, source: Any, tokenizer_kwargs: dict) -> dict:
        tok = self.tokenizer
        if isinstance(source, str) or (
            isinstance(source, (list, tuple)) and source and all(isinstance(s, str) for s in source)
        ):  # a tuple of strings is what a DataLoader collates a batch of strings into
            texts = [source] if isinstance(source, str) else list(source)
            options = {"return_tensors": "pt", "padding": True, **tokenizer_kwargs}  # (the user's padding= wins)
            encoded = tok(texts, **options)
            # what HF users pass with model(**tokenizer(...)): every tokenizer output the forward accepts
            return {k: v for k, v in encoded.items() if k in _MODEL_INPUTS and _accepts(self._module, k)}
        if isinstance(source, dict) or hasattr(source, "data") and hasattr(source, "keys"):
            if "input_ids" not in source:
                raise TypeError("a dict input needs an 'input_ids' entry (like a tokenizer's BatchEncoding)")
            out = {k: _as_ids(source[k], k) for k in source.keys() if k in _MODEL_INPUTS and _accepts(self._module, k)}
        elif isinstance(source, torch.Tensor) or isinstance(source, list):
            if isinstance(source, list) and not source:
                raise ValueError(f"an empty list is not a language-model input; {_ACCEPTED}")
            if isinstance(source, list) and source and isinstance(source[0], list):
                if len({len(row) for row in source}) > 1:
                    padded = tok.pad({"input_ids": source}, return_tensors="pt")
                    return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
            out = {"input_ids": _as_ids(source, "input ids")}
        else:
            raise TypeError(f"cannot use a {type(source).__name__} as a language-model input; {_ACCEPTED}")
        out.setdefault("attention_mask", torch.ones_like(out["input_ids"]))
        return out

    def _batch_inputs(self, invokes: list[InvokeInputs]) -> tuple[tuple, dict]:
        encodings = [inv.kwargs for inv in invokes if inv.batch_size]
        if not encodings:
            raise ValueError("no invoke of this trace was given an input; give at least one invoke an input")
        length = max(e["input_ids"].shape[1] for e in encodings)
        left = self.tokenizer.padding_side == "left"
        pad_id = self.tokenizer.pad_token_id
        batch: dict[str, torch.Tensor] = {}
        for key in encodings[0]:
            if any(key not in e for e in encodings):
                raise ValueError(f"some invokes give {key!r} and others do not; give it in every invoke or none")
            fill = pad_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
            pieces = [_pad(e[key], length, fill, left) for e in encodings]
            if key == "labels" and left:
                for e, piece in zip(encodings, pieces):
                    missing = length - e[key].shape[1]
                    if missing:  # alone, a prompt's first token is never a target; padded, a pad would predict it
                        piece[:, missing] = -100
            batch[key] = torch.cat(pieces, dim=0)
        return (), batch

    def _ended_early(self, method: str, kwargs: dict, output: Any) -> Optional[str]:
        """A generation ends early when every sequence reached its end-of-sequence token before max_new_tokens:
        then a `.next()` loop over max_new_tokens steps reads steps that never came (their values stay unset)."""
        asked, prompt = kwargs.get("max_new_tokens"), kwargs.get("input_ids")
        ids = getattr(output, "sequences", output)  # (return_dict_in_generate=True)
        if method != "generate" or type(asked) is not int or not isinstance(prompt, torch.Tensor) or not (
            isinstance(ids, torch.Tensor) and ids.ndim == 2
        ):
            return None
        start = 1 if getattr(self.config, "is_encoder_decoder", False) else prompt.shape[-1]  # (decoder start id)
        made = ids.shape[-1] - start
        if made >= asked:
            return None
        return (f"the generation ended after {made} of max_new_tokens={asked} steps (every sequence reached its "
                "end-of-sequence token; pass min_new_tokens= to generate them all)")  # fmt: skip

    def _batch_factors(self, method: str, kwargs: dict) -> tuple[int, ...]:
        """Generation runs num_beams rows per prompt (num_return_sequences when sampling) and returns
        num_return_sequences rows per prompt, each prompt's rows next to each other."""
        if method != "generate":
            return ()
        config = kwargs.get("generation_config") or getattr(self._module, "generation_config", None)
        factors = set()
        for name in ("num_beams", "num_return_sequences"):
            k = kwargs.get(name, getattr(config, name, 1))
            if type(k) is int and k > 1:
                factors.add(k)
        return tuple(sorted(factors))

    def _scan_method(self, method: str) -> str:
        """A scan of a generation runs its first step: one forward pass."""
        return "forward" if method == "generate" else method

    def _execute(self, method: str, args: tuple, kwargs: dict, dispatch: bool = True,
                 call: Optional[Callable] = None) -> Any:
        if dispatch:  # a scan runs on fake weights and must not load the real ones
            self._ensure_dispatched()
        module = self._module
        device = _first_device(module)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        if method == "generate":
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            streamer = self._generator_module.streamer
            if is_hooked(streamer):  # the graph reads it (beam search can't)
                kwargs["streamer"] = _StreamerBridge(streamer, kwargs.get("streamer"))
            ids = module.generate(*args, **kwargs)
            return self._generator_module(ids)
        if method == "forward" and _is_causal(module) and "position_ids" not in kwargs and "attention_mask" in kwargs:
            if _accepts(module, "position_ids"):
                kwargs["position_ids"] = position_ids_from_mask(kwargs["attention_mask"])
        target = module if method == "forward" else getattr(module, method)  # (trace(method=...))
        if call is not None:
            return call(target, args, kwargs)
        return target(*args, **kwargs)


class _Args(tuple):
    """The positional inputs of an invoke of a language model, ``(encoding,)``; a string key reads the encoding, so
    code written for either form of ``invoker.inputs`` (``[0][0]["input_ids"]`` or ``[0]["input_ids"]``) works."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, 0)[key]
        return tuple.__getitem__(self, key)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens: a left-padded prompt gets the positions it has when run alone."""
    positions = mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def _pad(t: torch.Tensor, length: int, fill: int, left: bool) -> torch.Tensor:
    missing = length - t.shape[1]
    if missing <= 0:
        return t
    pad = torch.full((t.shape[0], missing), fill, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


_ACCEPTED = ("give a string, a list of strings, token ids (a list of ints, a list of lists of ints, a 1-D/2-D "
             "integer tensor) or a dict/BatchEncoding with 'input_ids'")


def _keyword_input(inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``model.trace(input_ids=..., attention_mask=...)``: the ids are the input, the other model inputs go to its
    preparation (as ``tracer.invoke(input_ids=...)`` does)."""
    if inputs or "input_ids" not in kwargs:
        return inputs, kwargs
    kwargs = dict(kwargs)
    invoker = dict(kwargs.pop("invoker_args", None) or kwargs.pop("invoker_kwargs", None) or {})
    invoker.update({k: kwargs.pop(k) for k in _MODEL_INPUTS if k in kwargs and k != "input_ids"})
    if invoker:
        kwargs["invoker_args"] = invoker
    return (kwargs.pop("input_ids"),), kwargs


def _as_ids(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    else:
        rows = value if value and isinstance(value[0], (list, tuple)) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for row in rows for v in row):
            raise TypeError(f"{what} must be whole numbers; {_ACCEPTED}")
        t = torch.tensor(value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got dtype {t.dtype}; {_ACCEPTED}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise TypeError(f"{what} must be 1-D or 2-D token ids, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty; an invoke needs at least one token")
    return t.long()


def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise ValueError(f"torch_dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got {value!r}")


def _load_config(source: str, kwargs: dict) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **{k: v for k, v in kwargs.items() if k in ("revision",
                                                     "trust_remote_code", "token", "cache_dir")})  # fmt: skip
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{source!r} is not a Hugging Face model: no usable config.json there ({exc}). Give a local directory "
            "written by save_pretrained, a hub repo id, or an nn.Module"
        ) from exc


def _carry_attached(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Move onto ``new`` (loaded from the checkpoint) the modules attached to the meta-device model ``old`` through
    an envoy, at the same paths: added ones, and ones that replaced a module of the architecture (``new``'s own is
    then dropped); and any other module ``old`` has and ``new`` lacks."""
    for name, child in list(old.named_modules())[1:]:
        parent, _, leaf = name.rpartition(".")
        try:
            present = new.get_submodule(name)
        except AttributeError:
            present = None
        if present is None or (child in _ATTACHED and present is not child):
            new.get_submodule(parent).add_module(leaf, child)  # (with its own children: they are found next)


def _load_weights(auto: Any, source: str, kwargs: dict) -> torch.nn.Module:
    try:
        return auto.from_pretrained(source, **kwargs)
    except Exception as exc:  # HF raises many kinds here (ValueError, OSError, AssertionError for a missing CUDA)
        hint = f" (device_map={kwargs['device_map']!r})" if "device_map" in kwargs else ""
        raise RuntimeError(f"could not load the weights of {source!r}{hint}: {exc}") from exc


def _load_tokenizer(tokenizer: Any, source: Optional[str], causal: bool) -> Any:
    if tokenizer is None:
        if source is None:
            raise ValueError("LanguageModel(module) needs tokenizer=... when the module was not loaded from a path")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    elif isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if causal:
        tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # as HF users do for GPT-2-style tokenizers
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with; set tokenizer.pad_token")
        tokenizer.pad_token = fallback
        logger.info("tokenizer has no pad token; padding with %r", fallback)
    return tokenizer


def _is_causal(module: torch.nn.Module) -> bool:
    """A decoder-only LM (left padding, positions from the attention mask), told by its HF class name."""
    return type(module).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _accepts(module: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _first_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


DECODER_BLOCKS = ("transformer.h", "model.layers", "gpt_neox.layers")  # GPT-2, Llama/Mistral/Qwen, GPT-NeoX


def decoder_blocks_path(model: Any) -> str:
    """Where a causal LM keeps its decoder blocks (``model.get(path)`` is their ModuleList), for scripts that work
    across architectures."""
    for path in DECODER_BLOCKS:
        try:
            model.get(path)
            return path
        except (AttributeError, KeyError):
            continue
    raise ValueError(f"cannot find the model's decoder blocks (looked for {', '.join(DECODER_BLOCKS)})")
