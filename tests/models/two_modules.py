"""A model file that breaks the convention: two nn.Module subclasses, so the build cannot know which to serve."""

from torch import nn


class Backbone(nn.Module):
    def forward(self, x):
        return x


class Classifier(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))
