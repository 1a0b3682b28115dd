"""hdcli.tasks.classify: the supervised pieces shared by finetune and pretrain, against hand computations."""

from __future__ import annotations

import numpy as np
import torch

from hdcli.tasks import classify


def test_topk_correct_counts_hits_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3, 0.2, 0.5],   # order 1, 5, 3, 4, 0, 2
                           [0.8, 0.1, 0.2, 0.3, 0.4, 0.5],   # order 0, 5, 4, 3, 2, 1
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # order 5, 4, 3, 2, 1, 0
    labels = torch.tensor([1, 1, 0])  # ranks 1, 6, 6
    assert classify.topk_correct(logits, labels, ks=(1, 5)).tolist() == [1.0, 1.0]
    labels = torch.tensor([5, 2, 1])  # ranks 2, 5, 5
    assert classify.topk_correct(logits, labels, ks=(1, 2, 5)).tolist() == [0.0, 1.0, 3.0]


def test_topk_correct_caps_k_at_the_class_count():
    logits = torch.tensor([[0.2, 0.1, 0.7], [0.5, 0.4, 0.1]])
    assert classify.topk_correct(logits, torch.tensor([1, 2]), ks=(1, 5)).tolist() == [0.0, 2.0]


def test_zero_bit_posterize_is_black_as_with_older_pillow():
    from PIL import Image

    img = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8))
    assert np.asarray(classify._posterize_zero_bits(img, 0)).max() == 0
    assert np.asarray(classify._posterize_zero_bits(img, 1)).max() == 128  # 200 keeps its top bit


def test_step_without_mixing_is_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    step = classify.ClassifyStep(5, smoothing=0.1)
    logits = model((images.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
                   / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    logp = logits.log_softmax(-1)
    by_hand = (0.9 * -logp[torch.arange(6), labels] + 0.1 * -logp.mean(-1)).mean()
    torch.testing.assert_close(step(model, images, labels), by_hand)


def test_step_with_mixup_drops_the_last_image_of_an_odd_batch():
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    step = classify.ClassifyStep(5, mixup=0.8, cutmix=1.0, smoothing=0.1)
    step(model, torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 4]))
    assert seen == [4]
