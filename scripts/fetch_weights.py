#!/usr/bin/env python3
"""Fetch every file the service loads into a Hugging Face cache, to copy to a GPU box without internet.

MusicGen needs more than its own repository: its text conditioner loads T5 (t5-base) through
transformers, its compression checkpoint points at EnCodec (facebook/encodec_32khz), and `mbd: true`
loads MultiBand Diffusion (facebook/multiband-diffusion, mbd_musicgen_32khz.th). Everything lands in
`HF_HOME/hub`, where audiocraft and transformers look, so on the offline box the service runs with
the same MUSICGEN_MODEL id plus `HF_HOME=<the copied directory>` and `HF_HUB_OFFLINE=1`.

    scripts/fetch_weights.py --hf-home ./weights --model facebook/musicgen-medium --dry-run
    scripts/fetch_weights.py --hf-home ./weights --model facebook/musicgen-medium
    rsync -a ./weights/ gpu-box:/var/lib/musicgen/huggingface/
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
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclasses.dataclass(frozen=True)
class Item:
    repo: str
    files: tp.Tuple[str, ...]  # "weights" stands for model.safetensors, or pytorch_model.bin without it
    why: str
    optional: tp.Tuple[str, ...] = ()  # fetched where the repository has them


def plan(models: tp.Sequence[str], mbd: bool, t5: str = DEFAULT_T5, encodec: str = DEFAULT_ENCODEC) -> tp.List[Item]:
    """What to fetch, in order: the MusicGen checkpoints first, since they name T5 and EnCodec."""
    items = [Item(m, ("state_dict.bin", "compression_state_dict.bin"), "MusicGen LM + compression config")
             for m in models]
    items.append(Item(encodec, ("config.json", "weights"), "EnCodec decoder", ("preprocessor_config.json",)))
    items.append(Item(t5, ("config.json", "spiece.model", "weights"), "T5 text encoder and tokenizer",
                      ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")))
    if mbd:
        items.append(Item(MBD_REPO, (MBD_FILE,), "MultiBand Diffusion decoder (mbd: true)"))
    return items


def parse_args(argv: tp.Optional[tp.Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", dest="models", metavar="HF_ID",
                        help="a MusicGen repository, repeatable (default: facebook/musicgen-small)")
    parser.add_argument("--hf-home", type=Path, default=Path(os.environ.get("HF_HOME", "~/.cache/huggingface")),
                        help="the Hugging Face home to fill (files go under HF_HOME/hub; default: $HF_HOME)")
    parser.add_argument("--no-mbd", action="store_true", help="skip MultiBand Diffusion (~2 GB)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    args = parser.parse_args(argv)
    args.models = args.models or ["facebook/musicgen-small"]
    for model in args.models:
        if not HF_ID.match(model) or os.path.exists(model) or model.startswith("debug"):
            parser.error(f"--model {model!r} is not a Hugging Face id such as facebook/musicgen-small")
    args.hf_home = args.hf_home.expanduser()
    return args


def describe(items: tp.Sequence[Item], hf_home: Path) -> str:
    lines = [f"into {hf_home / 'hub'}:"]
    for item in items:
        files = ", ".join("model.safetensors (or pytorch_model.bin)" if f == "weights" else f for f in item.files)
        files += "".join(f", {f} (if present)" for f in item.optional)
        lines.append(f"  {item.repo}: {files}  [{item.why}]")
    return "\n".join(lines)


def named_dependencies(lm_file: str, compression_file: str) -> tp.Tuple[tp.Optional[str], tp.Optional[str]]:
    """The T5 and the pretrained EnCodec a downloaded MusicGen checkpoint names (None: it names none)."""
    import omegaconf  # only for a real download: --dry-run and --help stay light
    import torch

    # The hub's checkpoints hold their training config as YAML text (audiocraft's loaders parse it the same way).
    cfg = omegaconf.OmegaConf.create(torch.load(lm_file, map_location="cpu", mmap=True, weights_only=True)["xp.cfg"])
    t5 = omegaconf.OmegaConf.select(cfg, "conditioners.description.t5.name")
    encodec = torch.load(compression_file, map_location="cpu", mmap=True, weights_only=True).get("pretrained")
    return t5, encodec


def fetch(items: tp.List[Item], hub: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    i = 0
    while i < len(items):
        item = items[i]
        print(f"fetching {item.repo} ({item.why})", flush=True)
        listed = set(api.list_repo_files(item.repo))
        names = [n for n in item.files if n != "weights"] + [n for n in item.optional if n in listed]
        if "weights" in item.files:
            names.append("model.safetensors" if "model.safetensors" in listed else "pytorch_model.bin")
        paths = {name: hf_hub_download(item.repo, name, cache_dir=hub) for name in names}
        if "state_dict.bin" in paths:  # fetch what this checkpoint really loads, not what we assumed
            t5, encodec = named_dependencies(paths["state_dict.bin"], paths["compression_state_dict.bin"])
            for name, default in ((t5, DEFAULT_T5), (encodec, DEFAULT_ENCODEC)):
                if name and name != default and all(other.repo != name for other in items):
                    template = next(other for other in items if other.repo == default)
                    items.append(dataclasses.replace(template, repo=name))
        i += 1


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    args = parse_args(argv)
    items = plan(args.models, mbd=not args.no_mbd)
    print(describe(items, args.hf_home))
    if args.dry_run:
        return 0
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        print("HF_HUB_OFFLINE is set: unset it to download", file=sys.stderr)
        return 1
    fetch(items, args.hf_home / "hub")
    print(f"done. Copy {args.hf_home} to the GPU box (e.g. /var/lib/musicgen/huggingface, the unit's HF_HOME) "
          f"and run with HF_HUB_OFFLINE=1 and MUSICGEN_MODEL={args.models[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
