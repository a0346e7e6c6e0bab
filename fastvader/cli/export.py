"""``fastvader export``: convert a trained LoRA to the diffusers, ComfyUI or kohya layout of its
backbone family (refused for a family the tool does not load; table in docs/trust.md)."""
from __future__ import annotations

from fastvader.cli.common import command_parser


def add_parser(sub) -> None:
    from fastvader.backbones import available_backbones
    from fastvader.io.lora_layouts import FORMATS

    p = command_parser(sub, "export", "convert a trained LoRA to the diffusers, ComfyUI or kohya layout",
                       config=False)
    p.add_argument("source", metavar="RUN_DIR_OR_FILE", help="a run directory (its lora.safetensors) or a LoRA file")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="target layout")
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write (not the source)")
    p.add_argument("--prefix", default=None, choices=["unet", "transformer"],
                   help="diffusers key prefix (default: transformer for Wan, unet otherwise)")
    p.add_argument("--backbone", default=None, choices=available_backbones(),
                   help="the family the LoRA was trained on, for files that do not record it")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.io.export import export_lora

    out = export_lora(args.source, args.format, args.out, prefix=args.prefix, family=args.backbone)
    print(f"wrote {out} ({args.format} layout)")
    return 0
