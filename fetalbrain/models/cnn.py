"""A small CNN in two variants that differ only in the convolution: standard or depthwise-separable.

Both share the stem (one standard 3x3 conv: a separable conv on a single grey channel would be a
rank-one filter bank), the widths, the depth, normalisation, pooling and head, so a comparison of
the two measures the convolution type and nothing else.
"""

from collections.abc import Sequence

from torch import nn


def separable_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1, as in Xception and MobileNet."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
    )


def conv_block(in_channels: int, out_channels: int, conv: str) -> nn.Sequential:
    if conv == "standard":
        layer = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    elif conv == "separable":
        layer = separable_conv(in_channels, out_channels)
    else:
        raise ValueError(f"model.net.conv={conv!r}: choose standard or separable")
    return nn.Sequential(layer, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True), nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        conv: str = "standard",
        drop_rate: float = 0.2,
    ):
        super().__init__()
        if not widths:
            raise ValueError("model.net.widths must list at least one width")
        blocks = [conv_block(in_chans, widths[0], "standard")]
        blocks += [conv_block(c_in, c_out, conv) for c_in, c_out in zip(widths[:-1], widths[1:])]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def get_classifier(self) -> nn.Module:
        """Same accessor as timm models, so fine-tuning code treats every net alike."""
        return self.classifier

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, features):
        return self.classifier(self.dropout(self.pool(features).flatten(1)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
