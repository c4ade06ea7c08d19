"""PedCLIP model tests: MoBE routing, losses, checkpointing, determinism (transformers' tiny-tester pattern)."""

import pytest
import torch
import torch.nn.functional as F
from pedclip_testing import randomize_experts, tiny_config

from modeling_pedclip import PedCLIPModel, PedCLIPMoBE, PedCLIPVisionModel

ROUTER_MODES = ("soft", "label", "topk")


class PedCLIPVisionModelTester:
    def __init__(self, batch_size=4, **vision_overrides):
        self.batch_size = batch_size
        self.vision_overrides = vision_overrides

    def get_config(self):
        return tiny_config(vision=self.vision_overrides).vision_config

    def prepare_config_and_inputs(self, seed=0):
        config = self.get_config()
        generator = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(self.batch_size, 3, config.image_size, config.image_size, generator=generator)
        labels = torch.randint(0, config.num_experts, (self.batch_size,), generator=generator)
        return config, pixel_values, labels

    def create_and_check_model(self, router_mode):
        config, pixel_values, labels = self.prepare_config_and_inputs()
        model = PedCLIPVisionModel(config).eval()
        out = model(pixel_values, body_part_labels=labels, router_mode=router_mode, output_hidden_states=True)
        tokens = (config.image_size // config.patch_size) ** 2 + 1
        assert out.last_hidden_state.shape == (self.batch_size, tokens, config.hidden_size)
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
        assert len(out.hidden_states) == config.num_hidden_layers + 1
        assert len(out.gate_logits) == len(config.moe_layers)
        for logits in out.gate_logits:
            assert logits.shape == (self.batch_size, config.num_experts) and logits.dtype == torch.float32


class PedCLIPModelTester:
    def __init__(self, batch_size=4, seq_length=7, **config_overrides):
        self.batch_size, self.seq_length = batch_size, seq_length
        self.config_overrides = config_overrides

    def get_config(self):
        return tiny_config(**self.config_overrides)

    def prepare_config_and_inputs(self, seed=0):
        config = self.get_config()
        generator = torch.Generator().manual_seed(seed)
        vision, text = config.vision_config, config.text_config
        inputs = {
            "pixel_values": torch.randn(self.batch_size, 3, vision.image_size, vision.image_size, generator=generator),
            "input_ids": torch.randint(1, text.vocab_size, (self.batch_size, self.seq_length), generator=generator),
            "attention_mask": torch.ones(self.batch_size, self.seq_length, dtype=torch.long),
            "body_part_labels": torch.randint(0, vision.num_experts, (self.batch_size,), generator=generator),
        }
        inputs["attention_mask"][0, -2:] = 0
        return config, inputs

    def create_and_check_model(self, router_mode):
        config, inputs = self.prepare_config_and_inputs()
        model = PedCLIPModel(config).eval()
        out = model(**inputs, return_loss=True, router_mode=router_mode)
        assert out.logits_per_image.shape == (self.batch_size, self.batch_size)
        assert torch.equal(out.logits_per_text, out.logits_per_image.t())
        assert out.image_embeds.shape == out.text_embeds.shape == (self.batch_size, config.projection_dim)
        torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(self.batch_size))
        assert torch.isfinite(out.loss) and out.gate_loss is not None


@pytest.mark.parametrize("router_mode", ROUTER_MODES)
def test_vision_model_outputs(router_mode):
    PedCLIPVisionModelTester(moe_layers=[0, 1]).create_and_check_model(router_mode)


@pytest.mark.parametrize("router_mode", ROUTER_MODES)
def test_model_outputs(router_mode):
    PedCLIPModelTester().create_and_check_model(router_mode)


def test_features_follow_clip():
    config, inputs = PedCLIPModelTester().prepare_config_and_inputs()
    model = PedCLIPModel(config).eval()
    out = model(**inputs)
    image = model.get_image_features(inputs["pixel_values"]).pooler_output
    text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
    torch.testing.assert_close(F.normalize(image, dim=-1), out.image_embeds)
    torch.testing.assert_close(F.normalize(text, dim=-1), out.text_embeds)
    assert not torch.allclose(image.norm(dim=-1), torch.ones(len(image)))  # projected, not normalised


def mobe_and_inputs(batch=6, experts=5, seed=0):
    config = tiny_config(vision={"num_experts": experts, "router_top_k": 2}).vision_config
    mobe = PedCLIPMoBE(config)
    randomize_experts(mobe, seed)
    torch.nn.init.normal_(mobe.gate.weight, std=1.0)
    generator = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(batch, 17, config.hidden_size, generator=generator)
    return mobe, hidden, hidden[:, 0]


def test_soft_is_the_gate_weighted_sum_of_single_experts():
    mobe, hidden, cls = mobe_and_inputs()
    soft, gate_logits = mobe(hidden, cls, "soft")
    scores = gate_logits.softmax(-1)
    per_expert = [mobe(hidden, cls, "label", torch.full((len(hidden),), e))[0] for e in range(mobe.num_experts)]
    expected = sum(scores[:, e, None, None] * out for e, out in enumerate(per_expert))
    assert (per_expert[0] - per_expert[1]).abs().max() > 1e-2  # the experts really differ
    torch.testing.assert_close(soft, expected, atol=1e-5, rtol=1e-5)


def test_topk_keeps_the_largest_gates_renormalised():
    mobe, hidden, cls = mobe_and_inputs()
    topk, gate_logits = mobe(hidden, cls, "topk")
    weights, experts = gate_logits.softmax(-1).topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = sum(
        weights[:, k, None, None] * mobe(hidden, cls, "label", experts[:, k])[0] for k in range(experts.shape[1])
    )
    torch.testing.assert_close(topk, expected, atol=1e-5, rtol=1e-5)


def test_topk_with_every_expert_equals_soft():
    mobe, hidden, cls = mobe_and_inputs()
    mobe.top_k = mobe.num_experts
    torch.testing.assert_close(mobe(hidden, cls, "topk")[0], mobe(hidden, cls, "soft")[0], atol=1e-5, rtol=1e-5)


def test_layer_output_mixes_like_the_paper():
    """With one MoBE layer, the layer's output under soft routing is the gate-weighted sum of its label outputs."""
    config, pixels, _ = PedCLIPVisionModelTester(batch_size=3).prepare_config_and_inputs()
    model = PedCLIPVisionModel(config).eval()
    randomize_experts(model)
    soft = model(pixels, router_mode="soft", output_hidden_states=True)
    scores = soft.gate_logits[0].softmax(-1)
    layer_out = lambda e: model(  # noqa: E731
        pixels, router_mode="label", body_part_labels=torch.full((3,), e), output_hidden_states=True
    ).hidden_states[-1]
    expected = sum(scores[:, e, None, None] * layer_out(e) for e in range(config.num_experts))
    torch.testing.assert_close(soft.hidden_states[-1], expected, atol=1e-5, rtol=1e-5)


def test_label_routing_trains_only_the_chosen_experts():
    mobe, hidden, cls = mobe_and_inputs()
    labels = torch.tensor([0, 0, 3, 3, 3, 0])
    out, gate_logits = mobe(hidden, cls, "label", labels)
    (out.sum() + gate_logits.sum()).backward()
    used = mobe.fc1_weight.grad.flatten(1).abs().sum(-1) > 0
    assert used.tolist() == [True, False, False, True, False]
    assert mobe.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "labels, message",
    [(None, "needs body_part_labels"), (torch.tensor([0, 1, 9, 0, 0, 0]), r"\[0, 5\)"), (torch.zeros(6), "integer")],
)
def test_label_routing_rejects_bad_labels(labels, message):
    mobe, hidden, cls = mobe_and_inputs()
    with pytest.raises(ValueError, match=message):
        mobe(hidden, cls, "label", labels)


def test_loss_is_contrastive_plus_weighted_gate_loss():
    config, inputs = PedCLIPModelTester(vision={"moe_layers": [0, 1]}).prepare_config_and_inputs()
    model = PedCLIPModel(config).eval()
    out = model(**inputs, return_loss=True, gate_loss_weight=0.3)
    targets = torch.arange(len(out.logits_per_image))
    contrastive = (F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)) / 2
    gate = sum(F.cross_entropy(g, inputs["body_part_labels"]) for g in out.gate_logits) / 2
    torch.testing.assert_close(out.contrastive_loss, contrastive)
    torch.testing.assert_close(out.gate_loss, gate)
    torch.testing.assert_close(out.loss, contrastive + 0.3 * gate)
    default = model(**inputs, return_loss=True)
    torch.testing.assert_close(default.loss, contrastive + config.gate_loss_weight * gate)


def test_no_gate_loss_without_labels():
    config, inputs = PedCLIPModelTester().prepare_config_and_inputs()
    inputs.pop("body_part_labels")
    out = PedCLIPModel(config).eval()(**inputs, return_loss=True)
    assert out.gate_loss is None and torch.equal(out.loss, out.contrastive_loss)


@pytest.mark.parametrize("router_mode", ROUTER_MODES)
def test_gradient_checkpointing_changes_neither_loss_nor_gradients(router_mode):
    config, inputs = PedCLIPModelTester(vision={"moe_layers": [0, 1], "router_top_k": 2}).prepare_config_and_inputs()
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    model = PedCLIPModel(config).train()

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs, return_loss=True, router_mode=router_mode).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.activation_checkpointing_enable()
    assert model.vision_model.encoder.layers[0].gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 20
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_eval_outputs_are_deterministic():
    config, inputs = PedCLIPModelTester(vision={"hidden_dropout_prob": 0.3}).prepare_config_and_inputs()
    model = PedCLIPModel(config).eval()
    first, second = model(**inputs, return_loss=True), model(**inputs, return_loss=True)
    assert torch.equal(first.logits_per_image, second.logits_per_image) and torch.equal(first.loss, second.loss)
    model.train()
    assert not torch.equal(model(**inputs).logits_per_image, model(**inputs).logits_per_image)


def test_bad_pixel_values_shape_is_a_clear_error():
    config, inputs = PedCLIPModelTester().prepare_config_and_inputs()
    inputs["pixel_values"] = inputs["pixel_values"][..., :16]
    with pytest.raises(ValueError, match="pixel_values must be"):
        PedCLIPModel(config)(**inputs)


def reference_soft_mixture(mobe: PedCLIPMoBE, hidden, scores):
    """The paper's formula, expert by expert, with plain autograd."""
    outputs = [mobe.expert_mlp(hidden, *(p[e] for p in (mobe.fc1_weight, mobe.fc1_bias, mobe.fc2_weight, mobe.fc2_bias)))
               for e in range(mobe.num_experts)]  # fmt: skip
    return sum(scores[:, e, None, None] * out for e, out in enumerate(outputs))


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
def test_soft_mixture_gradients_match_the_formula(hidden_act):
    """The fused soft path (activations scaled in place) gives the reference gradients for experts, gate and input."""
    config = tiny_config(vision={"hidden_act": hidden_act}).vision_config
    mobe = PedCLIPMoBE(config).double()
    randomize_experts(mobe)
    hidden = torch.randn(3, 9, config.hidden_size, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(3, config.num_experts, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 9, config.hidden_size, dtype=torch.float64)

    def grads(fn):
        mobe.zero_grad(), setattr(hidden, "grad", None), setattr(logits, "grad", None)
        (fn(hidden, logits.softmax(-1)) * target).sum().backward()
        return [hidden.grad.clone(), logits.grad.clone()] + [p.grad.clone() for p in mobe.parameters() if p.grad is not None]

    fused, reference = grads(mobe.soft_mixture), grads(lambda h, s: reference_soft_mixture(mobe, h, s))
    assert len(fused) == len(reference) == 6
    for got, expected in zip(fused, reference):
        torch.testing.assert_close(got, expected)


def test_scale_experts_gradient_with_a_zero_gate():
    """Where a gate weight is exactly 0 its score gradient is 0, and every other gradient is exact."""
    from modeling_pedclip import ScaleExperts

    activations = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # 2 images x 2 tokens, 3 experts x 2
    scores = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 6, dtype=torch.float64)
    fused = ScaleExperts.apply(activations * 1, scores)
    fused.backward(grad_out)
    fused_grads = activations.grad.clone(), scores.grad.clone()
    activations.grad = scores.grad = None
    per_token = scores.repeat_interleave(2, 0).repeat_interleave(2, 1)
    (activations * per_token).backward(grad_out)
    torch.testing.assert_close(fused_grads[0], activations.grad)
    expected_scores_grad = scores.grad.clone()
    expected_scores_grad[0, 2] = 0.0
    torch.testing.assert_close(fused_grads[1], expected_scores_grad)
