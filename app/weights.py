"""Where the weights come from: a Hugging Face id (from its cache, downloaded where there is internet), a local
directory, or the tiny built-in `debug` models; and, when a load fails, a message that names the real cause.

Checkpoints load under torch's `weights_only=True`, with exactly the extra types the released files pickle.
"""

import collections
import contextlib
import importlib
import os
import pickle
import re
import tempfile
import typing as tp

import omegaconf
import torch
from audiocraft.models import MusicGen
from audiocraft.models.loaders import load_diffusion_models
from audiocraft.models.multibanddiffusion import DiffusionProcess, MultiBandDiffusion
from audiocraft.modules.diffusion_schedule import NoiseSchedule

from . import debug_models

# torch >= 2.6 loads checkpoints with weights_only=True and audiocraft 1.3.0 does not say otherwise.
# The MBD checkpoint pickles one omegaconf training config per band: allow exactly the types such a
# config is made of, for the duration of the checkpoint loads only, instead of unpickling arbitrary objects.
OMEGACONF_GLOBALS: tp.List[tp.Any] = [
    omegaconf.DictConfig, omegaconf.ListConfig, omegaconf.base.ContainerMetadata, omegaconf.base.Metadata,
    omegaconf.nodes.AnyNode, omegaconf.nodes.StringNode, omegaconf.nodes.IntegerNode, omegaconf.nodes.FloatNode,
    omegaconf.nodes.BooleanNode, omegaconf.nodes.EnumNode, omegaconf.nodes.PathNode, omegaconf.nodes.BytesNode,
    tp.Any, dict, list, int, float, bool, str, collections.defaultdict,
]

# How torch names the type it refused (its UnpicklingError, weights_only=True).
REFUSED_TYPE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
TRUSTED_TYPES_SETTING = "MUSICGEN_TRUSTED_CHECKPOINT_TYPES"


class ModelLoadError(RuntimeError):
    """The weights could not be loaded; the message says what to set."""


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"MUSICGEN_DEVICE={setting} but CUDA is not available (use auto or cpu)")
    return setting


@contextlib.contextmanager
def checkpoint_types(trusted: tp.Sequence[str] = ()) -> tp.Iterator[None]:
    """Checkpoint loads inside this block may unpickle omegaconf's config types and the `trusted` ones
    (fully qualified names, MUSICGEN_TRUSTED_CHECKPOINT_TYPES), and nothing else beyond torch's defaults."""
    allowed = list(OMEGACONF_GLOBALS)
    for name in trusted:
        module, _, attribute = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError, ValueError) as e:
            raise ModelLoadError(f"{TRUSTED_TYPES_SETTING} names {name!r}, which cannot be imported: {e}") from None
    with torch.serialization.safe_globals(allowed):
        yield


def load_failure(what: str, e: Exception, remedy: str) -> ModelLoadError:
    """Why a load failed, the real cause first: a missing Python package, a type the checkpoint pickles
    that weights_only=True refuses, or else `remedy` (what to set or fetch)."""
    seen: tp.Set[int] = set()
    cause: tp.Optional[BaseException] = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ImportError):
            package = f"the Python package {cause.name.split('.')[0]!r}" if cause.name else "a Python package"
            return ModelLoadError(
                f"{what}: {package} is missing ({type(cause).__name__}: {cause}). Install the service's "
                "pinned set into its virtualenv: pip install --no-deps -r requirements.txt (scripts/serve does).")
        refused = REFUSED_TYPE.search(str(cause)) if isinstance(cause, pickle.UnpicklingError) else None
        if refused:
            return ModelLoadError(
                f"{what}: the checkpoint pickles {refused[1]}, which torch refuses to unpickle with "
                f"weights_only=True. If you trust the file, allow that type: {TRUSTED_TYPES_SETTING}={refused[1]} "
                "(README, Configuration: a trusted type lets the file build objects of that type).")
        cause = cause.__cause__ or cause.__context__
    return ModelLoadError(f"{what}: {type(e).__name__}: {e}. {remedy}")


def load_musicgen(name: str, device: str, trusted_types: tp.Sequence[str] = ()) -> MusicGen:
    """MusicGen from a Hugging Face id, a local checkpoint directory, or a built-in tiny model (`debug*`)."""
    if name in debug_models.MODELS:
        return debug_models.build_musicgen(name, device)
    try:
        with checkpoint_types(trusted_types):
            return MusicGen.get_pretrained(name, device=device)
    except ModelLoadError:
        raise
    except Exception as e:
        where = "directory" if os.path.isdir(name) else "Hugging Face id"
        raise load_failure(
            f"could not load MUSICGEN_MODEL={name!r} ({where})", e,
            "Set MUSICGEN_MODEL to a directory holding state_dict.bin and compression_state_dict.bin, "
            "or fetch the weights into the Hugging Face cache (HF_HOME) on a machine with internet "
            "and run with HF_HUB_OFFLINE=1, or use MUSICGEN_MODEL=debug to try the service.") from e


def load_mbd(source: str, codec: torch.nn.Module, device: str,
             trusted_types: tp.Sequence[str] = ()) -> MultiBandDiffusion:
    """MultiBand Diffusion for 32 kHz MusicGen tokens, decoding through `codec` (mono EnCodec).

    `source` is a Hugging Face id, a directory holding mbd_musicgen_32khz.th, that file, or `debug`;
    all of them go through audiocraft's loader under torch's default `weights_only=True`.
    """
    with contextlib.ExitStack() as stack:
        if source == "debug":
            source = stack.enter_context(tempfile.TemporaryDirectory(prefix="musicgen-mbd-"))
            torch.save(debug_models.mbd_package(), os.path.join(source, debug_models.MBD_FILE))
        try:
            with checkpoint_types(trusted_types):
                models, processors, cfgs = load_diffusion_models(source, device=device,
                                                                 filename=debug_models.MBD_FILE)
        except ModelLoadError:
            raise
        except Exception as e:
            raise load_failure(
                f"could not load MultiBand Diffusion from MUSICGEN_MBD_MODEL={source!r}", e,
                "Fetch facebook/multiband-diffusion into the Hugging Face cache or point MUSICGEN_MBD_MODEL "
                f"at a directory holding {debug_models.MBD_FILE}.") from e
    processes = [
        DiffusionProcess(model=model.eval(), noise_schedule=NoiseSchedule(**cfg.schedule, sample_processor=processor,
                                                                          device=device))
        for model, processor, cfg in zip(models, processors, cfgs, strict=True)]
    return MultiBandDiffusion(DPs=processes, codec_model=codec)
