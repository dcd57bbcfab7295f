"""`domainmerge adapt`: phase 1, single-target self-training from a labelled source to a target."""

from __future__ import annotations

import argparse

from domainmerge.errors import UserError

DESCRIPTION = """\
Adapt a network from a labelled source dataset to an unlabelled target dataset by self-training
(DAFormer's DACS; HRDA multi-resolution training with --recipe hrda; masked image consistency
with --mic). Defaults are the authors' settings for the recipe (40k iterations, batch 2, AdamW
6e-5 with head x10, warm-up 1500 then poly decay, EMA teacher 0.999, threshold 0.968, ClassMix,
rare-class sampling, thing-class ImageNet feature distance 0.005).

Writes OUT/iter_N.pth every --save-every iterations and OUT/latest.pth (the authors' container:
student under model., teacher under ema_model., frozen ImageNet copy under imnet_model.; read by
`merge --only model.` and `evaluate`), and OUT/log.jsonl. Scale out with torchrun (the global
batch is ranks x --batch-size):
  torchrun --nproc_per_node 4 -m domainmerge adapt --source gta data/gta --target cityscapes \\
      data/cityscapes --arch hrda_mitb5 --recipe hrda --pretrained mit_b5.pth --out runs/cs
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("adapt", help="self-train a network from a source to a target domain (phase 1)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", nargs="+", required=True, metavar="KIND ROOT [SPLIT]",
                   help="labelled source dataset (split default train)")
    p.add_argument("--target", nargs="+", required=True, metavar="KIND ROOT [SPLIT]",
                   help="unlabelled target dataset (split default train; its labels are never read)")
    p.add_argument("--val", nargs=3, metavar=("KIND", "ROOT", "SPLIT"), help="labelled validation set of the target")
    p.add_argument("--arch", required=True, help="network, e.g. daformer_mitb5, daformer_r101, hrda_mitb5")
    p.add_argument("--pretrained", help="ImageNet backbone weights (mit_b*.pth, nvidia/mit-b* safetensors, "
                                        "mmseg ResNetV1c); default: random initialisation")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of --pretrained")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", choices=["daformer", "hrda"], default="daformer", help="the authors' recipe")
    p.add_argument("--mic", action="store_true", help="add MIC's masked image consistency")
    p.add_argument("--recipe-file", metavar="YAML", help="recipe values to change, a mapping 'setting: value' "
                                                         "(applied after --recipe/--mic)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="change one recipe value (after --recipe-file), e.g. --set warmup_iters=50 --set rcs=false "
                        "--set betas=[0.9,0.99]; repeatable; the names are the fields of "
                        "domainmerge.training.Recipe")
    p.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"),
                   help="training crop of both domains (default: the recipe's, 512 or 1024; capped to the images)")
    p.add_argument("--iters", type=int, help="iterations (default 40000)")
    p.add_argument("--batch-size", type=int, help="source and target images per process and iteration (default 2)")
    p.add_argument("--val-every", type=int, default=4000, help="validate every N iterations (default 4000)")
    p.add_argument("--save-every", type=int, default=5000, help="write iter_N.pth every N iterations (default 5000)")
    p.add_argument("--log-every", type=int, default=50, help="a log.jsonl line every N iterations (default 50)")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="none",
                   help="mixed precision (CUDA; bf16 also on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int,
                   help="data loading processes per rank (default 2; 0 for the in-memory synthetic world)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   help="torch.compile the backbones and heads (faster iterations on a GPU after a compile of "
                        "minutes); MODE: default, reduce-overhead (also CUDA graphs), max-autotune, "
                        "max-autotune-no-cudagraphs")
    p.add_argument("--compile-blocks", action="store_true",
                   help="compile the backbone block by block (implies --compile): a fraction of the compile "
                        "time for deep backbones (the blocks of a stage share one graph), one call per block")
    p.add_argument("--one-pass", action="store_true",
                   help="the student's source, ClassMix and MIC views in one forward (MiT: one backbone call) "
                        "and one backward: fewer kernels, up to 3x the activation memory; the same gradients "
                        "to float rounding")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC convolutions on CUDA (faster for ResNet backbones; float rounding differs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from latest.pth")
    p.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    p.set_defaults(func=run)


FLAGS = {"crop_size": "--crop"}


def _dataset(values: list[str], option: str) -> tuple[str, str, str]:
    if len(values) not in (2, 3):
        raise UserError(f"{option} {' '.join(values)}: give KIND ROOT [SPLIT]")
    return values[0], values[1], values[2] if len(values) == 3 else "train"


def run(args: argparse.Namespace) -> int:
    from domainmerge.runtime.device import resolve_device
    from domainmerge.training import AdaptConfig, adapt, get_recipe
    from domainmerge.training.recipe import parse_settings, read_recipe_file

    overrides = {k: v for k, v in (("iters", args.iters), ("batch_size", args.batch_size)) if v is not None}
    for name, value in overrides.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    for name in ("val_every", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.recipe_file:
        overrides.update(read_recipe_file(args.recipe_file))
    overrides.update(parse_settings(args.settings, where="--set"))
    config = AdaptConfig(
        source=_dataset(args.source, "--source"), target=_dataset(args.target, "--target"),
        val=tuple(args.val) if args.val else None, out=args.out, arch=args.arch, pretrained=args.pretrained,
        trust_pickle=args.trust_pickle, recipe=get_recipe(args.recipe, mic=args.mic, **overrides),
        crop_size=tuple(args.crop) if args.crop else None,
        val_every=args.val_every, save_every=args.save_every, log_every=args.log_every, amp=args.amp,
        seed=args.seed, workers=args.workers, device=resolve_device(args.device), resume=args.resume,
        force=args.force, compile=args.compile or False, compile_blocks=args.compile_blocks,
        one_pass=args.one_pass, channels_last=args.channels_last)
    result = adapt(config)
    if result.checkpoint is not None:
        print(f"wrote {result.checkpoint} (iteration {result.iterations})")
    return 0
