"""ReCLIP++ rectifier and Reference prompt on tiny random CLIPs."""

from __future__ import annotations

import copy
import functools
import json
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_clip as shared_tiny_clip
from reclip.clip.model import CLIP
from reclip.clip.tokenizer import EOT, SOT, get_tokenizer
from reclip.features import dense_features, get_strategy
from reclip.heads.bias import DependentBias
from reclip.heads.reference import ReferencePrompt
from reclip.heads.rectify import (
    ABLATIONS,
    PRESETS,
    RECLIP,
    RECLIPPP,
    Rectifier,
    RectifierConfig,
    class_query_weights,
    rectification_loss,
)
from reclip.heads.losses import contrastive_loss, gumbel_masks
from reclip.text import QueryEmbeddings

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "potted plant", "sky", "person"]  # 1, 2, 1, 1 BPE tokens


# Two text heads and layers: the Reference prompt's shared-prefix encoding is per head and layer.
tiny_clip = functools.partial(shared_tiny_clip, transformer_heads=2, transformer_layers=2)


def queries_for(clip: CLIP, num_classes: int, seed: int = 1) -> QueryEmbeddings:
    g = torch.Generator().manual_seed(seed)
    w = F.normalize(torch.randn(num_classes, clip.visual.output_dim, generator=g), dim=-1)
    return QueryEmbeddings(w, torch.arange(num_classes), num_classes)


def images(*size: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


def rectifier(clip: CLIP, config: RectifierConfig = RECLIPPP, names=NAMES) -> Rectifier:
    return Rectifier(clip, queries_for(clip, len(names)), names, config)


# -- Reference prompt -------------------------------------------------------------------


@pytest.mark.parametrize("length", [None, 5])
@pytest.mark.parametrize("norm", ["frobenius", "row"])
def test_prefix_shared_encoding_equals_full_encoding(length, norm):
    clip = tiny_clip(transformer_width=128, transformer_heads=4, transformer_layers=3)
    for p in clip.parameters():
        p.requires_grad_(False)
    ref = ReferencePrompt(clip, NAMES + ["traffic light", "tree"], length=length, init="normal", norm=norm)
    assert ref.suffix_tokens.shape[1] == 3  # suffixes of different lengths share one padded batch
    shared, full = ref(), ref.forward_full()
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    # both backpropagate into the shared context, with the same gradient
    target = torch.randn_like(shared)
    g_shared, = torch.autograd.grad((shared * target).sum(), ref.context)
    g_full, = torch.autograd.grad((full * target).sum(), ref.context)
    assert g_shared.abs().sum() > 0
    torch.testing.assert_close(g_shared, g_full, rtol=1e-4, atol=1e-5 * g_full.abs().max().item())
    # the prefix really matters: another context gives another W_r
    with torch.no_grad():
        ref.context.add_(torch.randn_like(ref.context))
    assert not torch.allclose(ref(), shared, atol=1e-4)


def test_reference_matches_clip_text_encoder_on_the_official_token_layout():
    # token0 init: the context is the embedding of token id 0, so the official input is
    # the token sequence [SOT, 0 x L, name, EOT, 0...], which encode_text reads at EOT.
    clip = tiny_clip()
    ref = ReferencePrompt(clip, NAMES, norm="row")
    L = ref.length
    assert L == 73 and torch.equal(ref.context, clip.token_embedding.weight[0].expand(L, -1))
    tok = get_tokenizer()
    tokens = torch.zeros(len(NAMES), 77, dtype=torch.long)
    for i, name in enumerate(NAMES):
        ids = [SOT] + [0] * L + tok.encode(name) + [EOT]
        tokens[i, : len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        expected = F.normalize(clip.encode_text(tokens), dim=-1)
        torch.testing.assert_close(ref(), expected, rtol=1e-5, atol=1e-6)


def test_long_names_keep_their_end_token_and_warn_naming_them():
    clip = tiny_clip()
    names = ["cat", "chest of drawers", "pottedplant"]  # 1, 3, 3 tokens; 2 slots left by L = 73
    with pytest.warns(UserWarning, match="chest of drawers") as record:
        ref = ReferencePrompt(clip, names)
    assert len(record) == 1 and "pottedplant" in str(record[0].message)
    assert ref.truncated == ("chest of drawers", "pottedplant")
    rows = torch.arange(3)
    assert (ref.suffix_tokens[rows, ref.eot_index] == EOT).all()
    assert ref.eot_index.tolist() == [1, 2, 2]
    tok = get_tokenizer()
    assert ref.suffix_tokens[1, :2].tolist() == tok.encode("chest of drawers")[:2]
    # W_r is read at EOT: equal to encoding the cut name with its EOT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = ReferencePrompt(clip, ["cat", "chest of", "pottedplant"])
    torch.testing.assert_close(ref()[:2], cut()[:2])
    # no warning when everything fits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReferencePrompt(clip, ["cat", "potted plant"])


def test_official_name_tokens_reproduce_the_official_layout():
    """dogehhh/ReCLIP: SOT + 73 context + tokenize(name)[1:4], read at 74 + argmax of those 3 ids."""
    clip = tiny_clip()
    names = ["cat", "potted plant", "pottedplant", "chest of drawers"]  # 1, 2, 3, 3 tokens
    with pytest.warns(UserWarning, match="as official") as record:
        ref = ReferencePrompt(clip, names, name_tokens="official", norm="row")
    assert len(record) == 1 and ref.truncated == ("pottedplant", "chest of drawers")
    tok = get_tokenizer()
    tokens = torch.zeros(len(names), 77, dtype=torch.long)
    read = []
    for i, name in enumerate(names):
        three = ([*tok.encode(name), EOT] + [0, 0])[:3]
        tokens[i] = torch.tensor([SOT] + [0] * 73 + three)
        read.append(74 + three.index(max(three)))
    assert read[2] != 76  # "pottedplant" lost its EOT and is read at a name token
    with torch.no_grad():
        expected = F.normalize(clip.encode_token_embeddings(clip.token_embedding(tokens), torch.tensor(read)), dim=-1)
        torch.testing.assert_close(ref(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref.forward_full(), expected, rtol=1e-5, atol=1e-6)
        # names that fit are encoded exactly as by default
        torch.testing.assert_close(ref()[:2], ReferencePrompt(clip, names[:2], norm="row")(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="name_tokens"):
        ReferencePrompt(clip, names, name_tokens="first3")
    assert RectifierConfig(reference_name_tokens="official").reference_name_tokens == "official"


def test_reference_norms_and_inits():
    clip = tiny_clip()
    w = ReferencePrompt(clip, NAMES)()
    assert torch.linalg.matrix_norm(w).item() == pytest.approx(1.0, abs=1e-5)  # official: whole matrix
    assert not torch.allclose(w.norm(dim=-1), torch.ones(len(NAMES)))
    row = ReferencePrompt(clip, NAMES, norm="row")()
    torch.testing.assert_close(row.norm(dim=-1), torch.ones(len(NAMES)))
    torch.manual_seed(0)
    normal = ReferencePrompt(clip, NAMES, init="normal")
    assert normal.context.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="name slots"):
        ReferencePrompt(clip, NAMES, length=75)
    with pytest.raises(ValueError, match="init"):
        ReferencePrompt(clip, NAMES, init="zeros")


# -- rectifier ----------------------------------------------------------------------------


def test_only_rectifier_parameters_get_gradients_and_clip_is_unchanged_after_a_step():
    clip = tiny_clip()
    before = copy.deepcopy(clip.state_dict())
    model = rectifier(clip)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    hyp = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    out = model.forward_train(images(2, 3, 32, 32))
    assert not out.features.requires_grad  # no graph through the frozen CLIP
    loss = rectification_loss(model, out, hyp, generator=torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.reference.context", "head.bias.pe_proj.weight", "head.bias.pe_proj.bias",
                         "head.decoder.conv.weight", "head.decoder.conv.bias", "head.decoder.norm.weight",
                         "head.decoder.norm.bias"}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for key, value in clip.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not clip.training  # model.train() keeps CLIP in eval mode


def test_loss_falls_on_a_fixed_batch():
    clip = tiny_clip()
    model = rectifier(clip).train()
    x = images(2, 3, 32, 32)
    hyp = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)

    def loss_at(step: int) -> torch.Tensor:
        return rectification_loss(model, model.forward_train(x), hyp, generator=torch.Generator().manual_seed(step))

    def mean_loss() -> float:  # over 4 fixed Gumbel draws: one draw is too noisy to compare
        with torch.no_grad():
            return sum(loss_at(1000 + i).item() for i in range(4)) / 4

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    before = mean_loss()
    for step in range(30):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_loss()
    assert after < 0.75 * before, (before, after)


def test_bias_subtract_and_add_differ_by_twice_the_bias():
    clip = tiny_clip()
    sub = rectifier(clip)
    add = rectifier(clip, dataclasses.replace(RECLIPPP, bias_op="add"))
    add.load_trainable_state_dict(sub.trainable_state_dict())
    sub.eval(), add.eval()
    x = images(1, 3, 32, 40)
    with torch.no_grad():
        a, b = sub.forward_train(x), add.forward_train(x)
    torch.testing.assert_close(a.query_logits, b.query_logits)
    torch.testing.assert_close(a.bias_logits, b.bias_logits)
    torch.testing.assert_close(a.rectified, a.query_logits - a.bias_logits)
    torch.testing.assert_close(b.rectified, b.query_logits + b.bias_logits)
    assert a.bias_logits.abs().max() > 1e-4
    assert not torch.allclose(a.decoded, b.decoded)


def test_outputs_follow_the_paper_equations():
    clip = tiny_clip()
    model = rectifier(clip).eval()
    x = images(2, 3, 32, 48)
    with torch.no_grad():
        out = model.forward_train(x)
        z = dense_features(clip, x, "maskclip")
        torch.testing.assert_close(out.features, z)
        torch.testing.assert_close(out.query_logits, torch.einsum("bdhw,cd->bchw", z, model.head.fixed_query))
        pe = clip.visual.grid_positional_embedding(4, 6).t().reshape(1, -1, 4, 6)
        w_p = model.head.bias.pe_proj(pe).flatten(2)[0].t()  # (n, D)
        m_b = (w_p @ model.head.reference().t()).t().reshape(1, 4, 4, 6)  # eq. 2, (1, C, h, w)
        torch.testing.assert_close(out.bias_logits, m_b.expand(2, -1, -1, -1))
        m_o = model.head.decoder.norm(model.head.decoder.conv(torch.cat([z, out.rectified], 1)))
        torch.testing.assert_close(out.decoded, m_o)
        torch.testing.assert_close(model(x), out.decoded)


def test_select_output_makes_forward_return_that_logit_map():
    model = rectifier(tiny_clip()).eval()
    x = images(2, 3, 32, 48)
    with torch.no_grad():
        out = model.forward_train(x)
        assert model.head.output == "decoded"
        for name, expected in (("rectified", out.rectified), ("query", out.query_logits), ("decoded", out.decoded)):
            assert model.select_output(name) is model
            torch.testing.assert_close(model(x), expected)
    assert not torch.equal(out.rectified, out.decoded) and not torch.equal(out.rectified, out.query_logits)
    with pytest.raises(ValueError, match="decoded, rectified, query"):
        model.select_output("bias")
    assert model.head.output == "decoded"  # a refused name changes nothing


def test_trainable_state_dict_has_no_clip_keys_and_round_trips():
    clip = tiny_clip()
    model = rectifier(clip)
    state = model.trainable_state_dict()
    assert state and not any(k.startswith(("clip.", "backbone.")) for k in state)
    assert "head.fixed_query" not in state and "head.decoder.norm.running_mean" in state
    other = rectifier(clip)
    with torch.no_grad():
        model.head.reference.context.add_(1.0)
    other.load_trainable_state_dict(model.trainable_state_dict())
    torch.testing.assert_close(other.head.reference.context, model.head.reference.context)
    # runs saved before the rectifier was split into parts load under their flat names
    flat = {k.replace("head.reference.", "reference.").replace("head.bias.", "").replace("head.decoder.conv.",
            "decoder_conv.").replace("head.decoder.norm.", "decoder_norm."): v for k, v in state.items()}
    assert "pe_proj.weight" in flat and "decoder_conv.weight" in flat
    other.load_trainable_state_dict(flat)
    torch.testing.assert_close(other.head.bias.pe_proj.weight, model.head.bias.pe_proj.weight)
    with pytest.raises(ValueError, match="missing"):
        rectifier(clip, RECLIP).load_trainable_state_dict(state)


def test_shapes_for_non_square_and_unpadded_inputs():
    clip = tiny_clip()
    model = rectifier(clip).eval()
    with torch.no_grad():
        assert model(images(2, 3, 32, 56)).shape == (2, 4, 4, 7)  # multiple of the patch: the grid
        assert model(images(1, 3, 30, 45)).shape == (1, 4, 30, 45)  # padded: cropped to the input
        out = model.forward_train(images(1, 3, 30, 45))
    assert all(t.shape == (1, 4, 4, 6) for t in out[1:]) and out.features.shape == (1, 32, 4, 6)


def test_nothing_hard_coded_other_widths_grid_and_context():
    clip = tiny_clip(embed_dim=48, image_resolution=24, vision_width=128, vision_patch_size=4,
                     context_length=16, transformer_width=128, transformer_heads=2, transformer_layers=1)
    for config in (RECLIPPP, RECLIP):
        model = rectifier(clip, config, names=["cat", "dog", "grass"])
        assert model.head.reference.length == 12  # context_length - 4
        out = model.forward_train(images(2, 3, 40, 28))
        assert out.decoded.shape == (2, 3, 10, 7) and out.features.shape == (2, 48, 10, 7)
        rectification_loss(model, out, torch.ones(2, 3, dtype=torch.bool)).backward()
        torch.testing.assert_close(model.head.reference(), model.head.reference.forward_full())


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_presets_and_ablations_construct_run_and_backprop(name):
    config = ABLATIONS[name]
    clip = tiny_clip()
    model = rectifier(clip, config).train()
    out = model.forward_train(images(2, 3, 32, 40))
    loss = rectification_loss(model, out, torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
    assert (model.head.decoder is not None) == config.decoder
    if not config.decoder:
        assert out.decoded is out.rectified
    assert isinstance(model.head.bias, DependentBias) == (config.bias_mode == "dependent")
    assert (model.head.query is not None) == config.learnable_query
    assert out.features.requires_grad == config.finetune_image_encoder
    keys = model.trainable_state_dict()
    assert any(k.startswith("backbone.clip.visual.") for k in keys) == config.finetune_image_encoder
    assert not any(k.startswith("backbone.") and not k.startswith("backbone.clip.visual.") for k in keys)


def test_reclip_dependent_bias_is_class_bias_from_features_plus_projnet():
    clip = tiny_clip()
    model = rectifier(clip, RECLIP).eval()
    assert PRESETS["reclip"] is RECLIP and RECLIP.gumbel_scale == 1000.0
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_train(x)
        pe = clip.visual.grid_positional_embedding(4, 4).t().reshape(1, -1, 4, 4)
        proj_net = model.head.bias.proj_net
        expected = torch.einsum("bdhw,cd->bchw", out.features, model.head.reference()) + proj_net(pe)
    torch.testing.assert_close(out.bias_logits, expected)
    assert proj_net[-3].out_channels == 4 and proj_net[0].in_channels == clip.visual.width


def test_synonym_queries_are_averaged_per_class():
    w = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = QueryEmbeddings(w, torch.tensor([0, 0, 1, 2, 2]), 3)
    wq = class_query_weights(q)
    torch.testing.assert_close(wq[0], F.normalize(w[0] + w[1], dim=0))
    torch.testing.assert_close(wq[1], w[2])
    torch.testing.assert_close(wq.norm(dim=-1), torch.ones(3))


def test_config_validation():
    with pytest.raises(ValueError, match="bias_op"):
        RectifierConfig(bias_op="multiply")
    with pytest.raises(ValueError, match="strategy"):
        RectifierConfig(strategy="nope")
    with pytest.raises(ValueError, match="unknown RectifierConfig"):
        RectifierConfig.from_dict({"decoderr": False})
    assert RectifierConfig.from_dict(RECLIP.to_dict()) == RECLIP
    nores = RectifierConfig(strategy=get_strategy("maskclip", residual=False, ffn=False))
    assert RectifierConfig.from_dict(json.loads(json.dumps(nores.to_dict()))) == nores  # as config.json keeps it
    clip = tiny_clip()
    with pytest.raises(ValueError, match="class names"):
        Rectifier(clip, queries_for(clip, 4), ["a", "b"])


# -- Gumbel masks and the loss ------------------------------------------------------------


def test_gumbel_masks_are_one_hot_match_torch_and_pass_gradients():
    logits = torch.randn(2, 5, 3, 4, requires_grad=True)
    masks = gumbel_masks(logits, tau=1.0, scale=100.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks.sum(1), torch.ones(2, 3, 4)) and set(masks.detach().unique().tolist()) <= {0.0, 1.0}
    again = gumbel_masks(logits, tau=1.0, scale=100.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    torch.manual_seed(7)
    ours = gumbel_masks(logits, tau=0.5, scale=3.0)
    torch.manual_seed(7)
    theirs = F.gumbel_softmax(logits * 3.0, tau=0.5, hard=True, dim=1)
    assert torch.equal(ours, theirs)
    (ours * torch.randn_like(ours)).sum().backward()
    assert logits.grad.abs().sum() > 0


def _official_loss(feat, gumbel, text, gt_cls, scale):
    """dogehhh/ReCLIP RECLIPPP.forward's loss loop, transcribed (feat (B,D,h,w), gumbel (B,h,w,C))."""
    loss = 0
    for j in range(feat.shape[0]):
        if len(gt_cls[j]) == 0:
            continue
        pooled = [torch.nn.AdaptiveAvgPool2d((1, 1))(feat[j][None] * gumbel[j, :, :, i][None]).reshape(1, -1)
                  for i in gt_cls[j]]
        sim = scale * torch.stack(pooled).squeeze(1) @ text.t()
        loss += F.cross_entropy(sim, torch.tensor(gt_cls[j]))
    return loss / feat.shape[0]


def test_contrastive_loss_matches_the_official_loop():
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(3, 8, 4, 5, generator=g), dim=1)
    masks = F.one_hot(torch.randint(0, 6, (3, 4, 5), generator=g), 6).permute(0, 3, 1, 2).float()
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    gt = [[0, 2, 5], [], [1]]  # an image without hypotheses still counts in the batch
    hyp = torch.zeros(3, 6, dtype=torch.bool)
    for b, cls in enumerate(gt):
        hyp[b, cls] = True
    ours = contrastive_loss(feat, masks, text, hyp, scale=100.0)
    torch.testing.assert_close(ours, _official_loss(feat, masks.permute(0, 2, 3, 1), text, gt, 100.0))
    area = contrastive_loss(feat, masks, text, hyp, scale=100.0, pool="mask_area")
    cosine = contrastive_loss(feat, masks, text, hyp, scale=100.0, pool="cosine")
    assert len({round(v.item(), 4) for v in (ours, area, cosine)}) == 3
    zero = contrastive_loss(feat, masks, text, torch.zeros(3, 6, dtype=torch.bool))
    assert zero.item() == 0.0


def test_the_reference_is_encoded_once_without_gradients_and_again_when_it_changes():
    model = rectifier(tiny_clip()).eval()
    ref = model.head.reference
    with torch.no_grad():
        first = ref()
        assert ref() is first  # reused: inference encodes the prompt once
        ref.context.add_(torch.randn_like(ref.context))  # trained or loaded weights: in place
        changed = ref()
        assert (changed - first).abs().max() > 1e-3
        torch.testing.assert_close(changed, ref.forward_full())
        ref.clip.text_projection.add_(torch.randn_like(ref.clip.text_projection))  # the text tower changed: again
        retowered = ref()
        assert not torch.allclose(retowered, changed)
        ref.context.add_(torch.randn_like(ref.context))
    with torch.inference_mode():
        inferred = ref()  # encoded in inference mode ...
        assert inferred.is_inference() and ref() is inferred
    with torch.no_grad():
        assert ref() is not inferred and not ref().is_inference()  # ... never handed out of it
    live = ref()  # with gradients: always encoded, differentiable
    assert live.requires_grad
    with torch.no_grad():
        before = ref()
    other = {k: v.clone() for k, v in rectifier(tiny_clip()).trainable_state_dict().items()}
    other["head.reference.context"] = torch.randn_like(other["head.reference.context"])
    model.load_trainable_state_dict(other)
    with torch.no_grad():
        after = ref()
        assert (after - before).abs().max() > 1e-3  # a loaded state is seen
        torch.testing.assert_close(after, ref.forward_full())
