"""One choice of device for every torch stage (issue 21, item 4): `auto` takes a CUDA GPU when one
is visible, else the CPU, and each stage's log names the device it used."""

import torch

from cryopose.device import describe_device, report_device, select_device


def test_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == select_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cpu") == torch.device("cpu") and select_device("cuda:1") == torch.device("cuda:1")


def test_the_log_names_the_device(monkeypatch, capsys):
    report_device("image2sphere training", "cpu")
    assert capsys.readouterr().out == f"image2sphere training: on cpu ({torch.get_num_threads()} torch threads)\n"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Card {i}")
    assert describe_device("cuda") == "cuda:0 (Card 0)" and describe_device("cuda:2") == "cuda:2 (Card 2)"
