#!/usr/bin/env python3
"""Fetch every file the service loads into a Hugging Face cache, to copy to a GPU box without internet.

MusicGen needs more than its own repository: its text conditioner loads T5 (t5-base) through
transformers, its compression checkpoint points at EnCodec (facebook/encodec_32khz), and `mbd: true`
loads MultiBand Diffusion (facebook/multiband-diffusion, mbd_musicgen_32khz.th). Those land in
`HF_HOME/hub`, where audiocraft and transformers look. Melody models also load Demucs' `htdemucs`
(it separates the melody stems), which demucs fetches through torch.hub: that file lands in
`TORCH_HOME/hub/checkpoints`. On the offline box the service runs with the same MUSICGEN_MODEL id plus
`HF_HOME` and `TORCH_HOME` pointing at the copied directories, and `HF_HUB_OFFLINE=1`.

    scripts/fetch_weights.py --hf-home ./hf --torch-home ./torch --model facebook/musicgen-melody --dry-run
    scripts/fetch_weights.py --hf-home ./hf --torch-home ./torch --model facebook/musicgen-melody
    rsync -a ./hf/ gpu-box:/var/lib/musicgen/huggingface/ && rsync -a ./torch/ gpu-box:/var/lib/musicgen/torch/
"""

import argparse
import dataclasses
import os
import re
import sys
import typing as tp
from pathlib import Path

# What the official MusicGen checkpoints name in their training config (xp.cfg); after downloading a
# model the script reads its checkpoints and fetches what they actually name.
DEFAULT_T5 = "t5-base"
DEFAULT_ENCODEC = "facebook/encodec_32khz"
MBD_REPO, MBD_FILE = "facebook/multiband-diffusion", "mbd_musicgen_32khz.th"
# demucs 4.0.1 loads `htdemucs` (its remote/htdemucs.yaml: one model, signature 955717e8) with
# torch.hub.load_state_dict_from_url(ROOT_URL + <its line in remote/files.txt>, check_hash=True), which
# reads TORCH_HOME/hub/checkpoints/<file name> when it is there and checks the hash only when it downloads.
HTDEMUCS_URL = "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th"
# Where deploy/musicgen@.service points HF_HOME and TORCH_HOME.
UNIT_HF_HOME, UNIT_TORCH_HOME = "/var/lib/musicgen/huggingface", "/var/lib/musicgen/torch"
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclasses.dataclass(frozen=True)
class Item:
    repo: str
    files: tp.Tuple[str, ...]  # "weights" stands for model.safetensors, or pytorch_model.bin without it
    why: str
    optional: tp.Tuple[str, ...] = ()  # fetched where the repository has them


@dataclasses.dataclass(frozen=True)
class HubCheckpoint:
    """A file torch.hub downloads into TORCH_HOME/hub/checkpoints (named as the URL's last part)."""

    url: str
    why: str

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[-1]


HTDEMUCS = HubCheckpoint(HTDEMUCS_URL, "Demucs htdemucs, melody stems (melody models, also for text-only requests)")


class Needs(tp.NamedTuple):
    """What a downloaded MusicGen checkpoint loads besides itself."""

    t5: tp.Optional[str]  # the T5 its text conditioner names (None: it has none)
    encodec: tp.Optional[str]  # the pretrained EnCodec its compression checkpoint points at (None: it holds its own)
    melody: bool  # it conditions on chroma stems, so it loads htdemucs


def is_melody(model: str) -> bool:
    """Before download, by the id (facebook/musicgen-melody, -melody-large, -stereo-melody...); the downloaded
    checkpoint has the last word (`named_dependencies`)."""
    return "melody" in model.rsplit("/", 1)[-1]


def plan(models: tp.Sequence[str], mbd: bool, t5: str = DEFAULT_T5,
         encodec: str = DEFAULT_ENCODEC) -> tp.List[tp.Union[Item, HubCheckpoint]]:
    """What to fetch, in order: the MusicGen checkpoints first, since they name T5 and EnCodec."""
    items: tp.List[tp.Union[Item, HubCheckpoint]] = [
        Item(m, ("state_dict.bin", "compression_state_dict.bin"), "MusicGen LM + compression config") for m in models]
    items.append(Item(encodec, ("config.json", "weights"), "EnCodec decoder", ("preprocessor_config.json",)))
    items.append(Item(t5, ("config.json", "spiece.model", "weights"), "T5 text encoder and tokenizer",
                      ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")))
    if mbd:
        items.append(Item(MBD_REPO, (MBD_FILE,), "MultiBand Diffusion decoder (mbd: true)"))
    if any(is_melody(m) for m in models):
        items.append(HTDEMUCS)
    return items


def parse_args(argv: tp.Optional[tp.Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", dest="models", metavar="HF_ID",
                        help="a MusicGen repository, repeatable (default: facebook/musicgen-small)")
    parser.add_argument("--hf-home", type=Path, default=Path(os.environ.get("HF_HOME", "~/.cache/huggingface")),
                        help="the Hugging Face home to fill (files go under HF_HOME/hub; default: $HF_HOME)")
    parser.add_argument("--torch-home", type=Path, default=Path(_torch_home()),
                        help="torch.hub's home to fill for melody models (files go under TORCH_HOME/hub/checkpoints; "
                             "default: $TORCH_HOME, as torch.hub reads it)")
    parser.add_argument("--no-mbd", action="store_true", help="skip MultiBand Diffusion (~2 GB)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    args = parser.parse_args(argv)
    args.models = args.models or ["facebook/musicgen-small"]
    for model in args.models:
        if not HF_ID.match(model) or os.path.exists(model) or model.startswith("debug"):
            parser.error(f"--model {model!r} is not a Hugging Face id such as facebook/musicgen-small")
    args.hf_home, args.torch_home = args.hf_home.expanduser(), args.torch_home.expanduser()
    return args


def _torch_home() -> str:
    """torch.hub's own default (torch.hub.get_dir() without set_dir), without importing torch."""
    return os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")


def describe(items: tp.Sequence[tp.Union[Item, HubCheckpoint]], hf_home: Path, torch_home: Path) -> str:
    lines = [f"into {hf_home / 'hub'}:"]
    for item in items:
        if isinstance(item, Item):
            files = ", ".join("model.safetensors (or pytorch_model.bin)" if f == "weights" else f for f in item.files)
            files += "".join(f", {f} (if present)" for f in item.optional)
            lines.append(f"  {item.repo}: {files}  [{item.why}]")
    checkpoints = [item for item in items if isinstance(item, HubCheckpoint)]
    if checkpoints:
        lines.append(f"into {torch_home / 'hub' / 'checkpoints'}:")
        lines += [f"  {item.file} from {item.url}  [{item.why}]" for item in checkpoints]
    return "\n".join(lines)


def named_dependencies(lm_file: str, compression_file: str) -> Needs:
    """What a downloaded MusicGen checkpoint loads: the T5 and pretrained EnCodec it names, and htdemucs or not."""
    import omegaconf  # only for a real download: --dry-run and --help stay light
    import torch

    # The hub's checkpoints hold their training config as YAML text (audiocraft's loaders parse it the same way).
    cfg = omegaconf.OmegaConf.create(torch.load(lm_file, map_location="cpu", mmap=True, weights_only=True)["xp.cfg"])
    t5 = omegaconf.OmegaConf.select(cfg, "conditioners.description.t5.name")
    melody = any(c.get("model") == "chroma_stem" for c in (cfg.get("conditioners") or {}).values())
    encodec = torch.load(compression_file, map_location="cpu", mmap=True, weights_only=True).get("pretrained")
    return Needs(t5, encodec, melody)


def fetch(items: tp.List[tp.Union[Item, HubCheckpoint]], hub: Path, checkpoints: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    i = 0
    while i < len(items):
        item = items[i]
        i += 1
        if isinstance(item, HubCheckpoint):
            fetch_hub_checkpoint(item, checkpoints)
            continue
        print(f"fetching {item.repo} ({item.why})", flush=True)
        listed = set(api.list_repo_files(item.repo))
        names = [n for n in item.files if n != "weights"] + [n for n in item.optional if n in listed]
        if "weights" in item.files:
            names.append("model.safetensors" if "model.safetensors" in listed else "pytorch_model.bin")
        paths = {name: hf_hub_download(item.repo, name, cache_dir=hub) for name in names}
        if "state_dict.bin" in paths:  # fetch what this checkpoint really loads, not what we assumed
            needs = named_dependencies(paths["state_dict.bin"], paths["compression_state_dict.bin"])
            for name, default in ((needs.t5, DEFAULT_T5), (needs.encodec, DEFAULT_ENCODEC)):
                if name and name != default and all(getattr(other, "repo", None) != name for other in items):
                    template = next(other for other in items if getattr(other, "repo", None) == default)
                    items.append(dataclasses.replace(template, repo=name))
            if needs.melody and HTDEMUCS not in items:
                items.append(HTDEMUCS)


def fetch_hub_checkpoint(item: HubCheckpoint, checkpoints: Path) -> None:
    """Download as torch.hub.load_state_dict_from_url(check_hash=True) would: the hash prefix after the `-`."""
    import torch

    target = checkpoints / item.file
    if target.exists():
        print(f"{target} is there", flush=True)
        return
    print(f"fetching {item.url} ({item.why})", flush=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(item.file)
    torch.hub.download_url_to_file(item.url, str(target), hash_prefix=match.group(1) if match else None)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = parse_args(argv)
    items = plan(args.models, mbd=not args.no_mbd)
    print(describe(items, args.hf_home, args.torch_home))
    if args.dry_run:
        return 0
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        print("HF_HUB_OFFLINE is set: unset it to download", file=sys.stderr)
        return 1
    fetch(items, args.hf_home / "hub", args.torch_home / "hub" / "checkpoints")
    copy = f"{args.hf_home} to the GPU box's HF_HOME (the unit's: {UNIT_HF_HOME})"
    if HTDEMUCS in items:
        copy += f" and {args.torch_home} to its TORCH_HOME (the unit's: {UNIT_TORCH_HOME})"
    print(f"done. Copy {copy}, and run with HF_HUB_OFFLINE=1 and MUSICGEN_MODEL={args.models[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
