"""Networks (plain/separable CNN, timm backbones, the WGAN-GP) and the LightningModules that train them; each module
declares its ``task`` and writes its own ``report`` after fit."""
