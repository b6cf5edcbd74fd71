"""Commands whose issue has not landed: they say so in one line and exit 2."""

from __future__ import annotations

import typer

from orbit_cli.console import not_built

LOW_PRECISION = "the low-precision base issue: quantize, load, preflight, convert"

convert_app = typer.Typer(help="Convert checkpoints: HF <-> Megatron, adapter export and merge.", no_args_is_help=True)


@convert_app.command("hf-to-megatron")
def hf_to_megatron(src: str = typer.Argument(..., help="HF checkpoint dir."), out: str = typer.Argument(..., help="Output dir.")) -> None:
    """HF checkpoint -> Megatron torch_dist checkpoint."""
    raise not_built("convert hf-to-megatron", LOW_PRECISION)


@convert_app.command("megatron-to-hf")
def megatron_to_hf(src: str = typer.Argument(..., help="Megatron checkpoint root."), out: str = typer.Argument(..., help="Output dir."),
                   hf_config: str = typer.Option(None, "--hf-config", help="Reference HF config dir.")) -> None:
    """Megatron torch_dist checkpoint -> HF checkpoint."""
    raise not_built("convert megatron-to-hf", LOW_PRECISION)


@convert_app.command("export-adapter")
def export_adapter(run_dir: str = typer.Argument(..., help="Run or checkpoint dir."), out: str = typer.Argument(..., help="Output dir.")) -> None:
    """Orbit adapter -> PEFT adapter directory."""
    raise not_built("convert export-adapter", LOW_PRECISION)


@convert_app.command("merge-adapter")
def merge_adapter(base: str = typer.Argument(..., help="Base HF checkpoint."), adapter: str = typer.Argument(..., help="Adapter dir."),
                  out: str = typer.Argument(..., help="Output dir.")) -> None:
    """Merge an adapter into its base, writing a bf16 HF checkpoint."""
    raise not_built("convert merge-adapter", LOW_PRECISION)


def quantize(
    fmt: str = typer.Argument(..., help="int4, fp8 or nvfp4."),
    src: str = typer.Argument(..., help="HF checkpoint dir."),
    out: str = typer.Argument(..., help="Output dir."),
) -> None:
    """Write a compressed-tensors checkpoint (int4 W4A16, fp8 block, nvfp4)."""
    raise not_built("quantize", LOW_PRECISION)


def preflight(
    precision: str = typer.Argument(..., help="int4, fp8, nvfp4 or bf16."),
    recipe: str = typer.Option(..., "--recipe", help="Recipe name or YAML path."),
) -> None:
    """Checkpoint and logprob parity gates between trainer and rollout engine."""
    raise not_built("preflight", LOW_PRECISION)
