"""``ultraflux lora``: LoRA adapters for other tools (export in diffusers' and the kohya/ComfyUI layouts)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="LoRA adapters: export for diffusers, ComfyUI and kohya's tools.", no_args_is_help=True)


@app.command("export")
def export(
    adapter: Path = typer.Argument(..., help="an adapter folder (weights + ultraflux_lora.json)"),
    fmt: str = typer.Option(..., "--format", help="diffusers (FluxPipeline.load_lora_weights) | kohya (ComfyUI, "
                            "Forge, InvokeAI, kohya's sd-scripts)"),
    out: Path = typer.Option(..., "--out", help="the file to write (*.safetensors)"),
) -> None:
    """Write one adapter as a single safetensors file another tool loads (docs/lora.md, "Export")."""
    from ultraflux_model.lora.apply import read_adapter
    from ultraflux_model.lora.export import export_adapter

    counts = export_adapter(read_adapter(adapter), fmt, out)
    typer.echo(f"wrote {out} ({fmt}: {counts['tensors']} tensors, {counts['modules']} layers)")
