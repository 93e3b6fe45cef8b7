"""The metrics.json of a finished fit: every number under stable names and the facts needed to trust them."""

from omegaconf import DictConfig

from fetalbrain.runs.layout import final_checkpoint


def run_summary(cfg: DictConfig, model, trainer, datamodule, metrics: dict, notes: list[str], seconds: float) -> dict:
    """The metrics.json of a run: every number under stable names and the facts needed to trust them."""
    import torch  # here, not at the top: commands that only read runs (card, compare) start faster

    checkpoint = trainer.checkpoint_callback
    net = cfg.model.get("net")
    return {
        "metrics": dict(sorted(metrics.items())),
        "run": {
            "task": model.task,
            "model": cfg.model.get("name"),
            "net": (net.get("name", net.get("_target_", net.get("encoder"))) if net else cfg.model.get("_target_")),
            "pretrained_source": getattr(getattr(model, "net", None), "pretrained_source", "none"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": cfg.data.image_size,
            "epochs_trained": trainer.current_epoch,
            "max_epochs": cfg.trainer.max_epochs,
            "train_seconds": round(seconds, 1),
            "best_checkpoint": final_checkpoint(checkpoint),
            "device": str(trainer.strategy.root_device),
            "processes": trainer.world_size,  # DDP ranks; the report covers the whole test set once
            "torch_threads": torch.get_num_threads(),
            "seed": cfg.get("seed"),
            "resumed": cfg.get("resume") is not None,  # then train_seconds counts the resumed part only
        },
        "data": datamodule.data_summary(),
        "classes": datamodule.class_names,
        "notes": notes,
    }
