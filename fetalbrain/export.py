"""Export a trained classifier: ``python -m fetalbrain.export [ckpt=PATH] format=onnx|torchscript``; a head finder
(``model=head_finder``) with ``format=slim``: its weights in float16 and settings, with a SHA256 file.

The exported net takes a batch of preprocessed images (N x C x H x W, normalised) and returns
logits. The model card (classes, preprocessing, evaluation results) is embedded: ONNX metadata
``fetalbrain``, TorchScript extra file ``fetalbrain.json``; ``python -m fetalbrain.predict
ckpt=model.onnx`` runs from the ONNX file alone.
"""

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from fetalbrain.inference.predictor import ONNX_METADATA_KEY, deployment_metadata
from fetalbrain.models.classifier import load_classifier
from fetalbrain.runs.checkpoints import latest_checkpoint, read_checkpoint, run_directory
from fetalbrain.runs.integrity import verify_checkpoint

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "slim": ".pt"}  # slim: a head finder's weights and settings
# torch's dynamo exporter writes opset 18 or newer: it has no lower implementations, and its down-conversion
# to 17 fails on our nets (the axes of Reduce*/Squeeze become inputs in 18 and cannot be turned back).
MIN_ONNX_OPSET = 18


def export_onnx(
    net: torch.nn.Module, example: torch.Tensor, card: dict, out: Path, opset: int = MIN_ONNX_OPSET
) -> Path:
    """torch's dynamo exporter (``torch.export``, then onnxscript), the batch dimension dynamic.

    ``example``'s batch size must be at least 2: ``torch.export`` specialises a dimension of size 1.
    One self-contained .onnx file: the weights inline (no external data file), the card in metadata.
    """
    import onnx

    if opset < MIN_ONNX_OPSET:
        raise ValueError(f"opset={opset}: the ONNX exporter (torch.export) writes opset {MIN_ONNX_OPSET} or newer")
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            net,
            (example,),
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(card))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def export_torchscript(net: torch.nn.Module, example: torch.Tensor, card: dict, out: Path) -> Path:
    with torch.no_grad():
        traced = torch.jit.trace(net, example)
    torch.jit.save(traced, str(out), _extra_files={"fetalbrain.json": json.dumps(card)})
    return out


def export(
    checkpoint: Path,
    format: str = "onnx",
    out: Path | None = None,
    opset: int = MIN_ONNX_OPSET,
    screening_rule: str = "youden",
    verify: bool = True,
) -> Path:
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"ckpt={checkpoint}: no such file")
    if format == "slim":  # a head finder: weights and settings only (what the project ships)
        from fetalbrain.models.head_finder import slim_checkpoint

        out = out or run_directory(checkpoint) / "head_finder.pt"
        verify_checkpoint(checkpoint, verify)
        slim_checkpoint(checkpoint, out)
        return out
    out = out or run_directory(checkpoint) / f"model{FORMATS[format]}"
    verify_checkpoint(checkpoint, verify)
    state = read_checkpoint(checkpoint)
    net = load_classifier(state).net.eval().to(memory_format=torch.contiguous_format)
    prep = state["hyper_parameters"]["preprocessing"]
    example = torch.zeros(2, prep["channels"], prep["image_size"], prep["image_size"])  # 2: see export_onnx
    card = deployment_metadata(checkpoint, state, screening_rule)
    if format == "onnx":
        return export_onnx(net, example, card, out, opset)
    return export_torchscript(net, example, card, out)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    checkpoint = Path(cfg.ckpt) if cfg.ckpt else latest_checkpoint(Path(cfg.paths.log_dir))
    out = export(checkpoint, cfg.format, Path(cfg.out) if cfg.out else None, cfg.opset, cfg.screening_rule, cfg.verify)
    print(f"exported {checkpoint} -> {out}")


if __name__ == "__main__":
    main()
