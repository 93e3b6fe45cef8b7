"""Networks (plain/separable CNN, timm backbones) and the LightningModule that trains them."""
