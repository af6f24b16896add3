"""Device helpers shared by the estimators."""

import torch
from torch import nn

from skpatchcore import ModuleExtractor, TorchvisionExtractor
from skpatchcore._device import copy_to, module_on

from .conftest import tiny_cnn

# "meta" stands for a second device on any machine: tensors with shapes but no data.


def tensors(module):
    return [*module.parameters(), *module.buffers()]


def test_module_on_its_own_device_is_the_module_itself():
    net = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]).load()
    assert module_on(net, "cpu") is net


def test_module_on_another_device_is_a_copy_there_and_the_module_stays():
    net = ModuleExtractor(tiny_cnn(), ["layer1", "layer2"]).load()
    moved = module_on(net, "meta")
    assert {t.device.type for t in tensors(net)} == {"cpu"}
    assert {t.device.type for t in tensors(moved)} == {"meta"}
    assert moved.state_dict().keys() == net.state_dict().keys()
    assert [p.requires_grad for p in moved.parameters()] == [p.requires_grad for p in net.parameters()]
    maps = moved(torch.rand(2, 3, 32, 32, device="meta"))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4)]


def test_module_on_keeps_shared_parameters_shared():
    layer = nn.Linear(3, 3)
    moved = module_on(nn.Sequential(layer, layer), "meta")
    assert moved[0].weight is moved[1].weight and len(list(moved.parameters())) == 2


def test_copy_of_a_torchvision_extractor_computes_the_same_features():
    # A deep copy of torchvision's feature-extraction graph module ran its training
    # graph: batch statistics in every BatchNorm, features off by tens of percent.
    net = TorchvisionExtractor("resnet18", weights=None).load()
    copied = copy_to(net, "cpu")
    assert copied is not net and not copied.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(copied(x), net(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        copied(x)  # running statistics must stay untouched
    for got, want in zip(copied.buffers(), net.buffers()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
