"""``fastvader export``: convert a trained LoRA to the diffusers, ComfyUI or kohya layout."""
from __future__ import annotations

from fastvader.cli.common import command_parser


def add_parser(sub) -> None:
    p = command_parser(sub, "export", "convert a trained LoRA to the diffusers, ComfyUI or kohya layout",
                       config=False)
    p.add_argument("source", metavar="RUN_DIR_OR_FILE", help="a run directory (its lora.safetensors) or a LoRA file")
    p.add_argument("--format", required=True, choices=["diffusers", "comfyui", "kohya"], help="target layout")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the .safetensors file")
    p.add_argument("--prefix", default="unet", choices=["unet", "transformer"],
                   help="diffusers key prefix: unet (UNet pipelines) or transformer (Wan, CogVideoX)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastvader.io.export import export_lora

    out = export_lora(args.source, args.format, args.out, prefix=args.prefix)
    print(f"wrote {out} ({args.format} layout)")
    return 0
