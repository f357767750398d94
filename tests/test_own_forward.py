"""Every score comes from the model's own forward: for each family of compress.architectures, on a tiny random model
with the family's logit post-processing switched on (Gemma 2 / Gemma 3's final logit soft-capping), perplexity equals
exp of the model's own loss, and the choice scorer's answer log-likelihoods equal a log-softmax of the model's own
logits. A path that called the decoder and the output embedding itself would skip the soft-capping."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import compress
from compress.architectures import FAMILIES
from compress.data import token_stream
from compress.evaluate import _windows
from compress.tasks import _scorer_class

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
# what each family needs beyond COMMON, and its logit post-processing set so that it bites (see spread_logits)
FEATURES = {
    "gemma2": dict(final_logit_softcapping=2.0, query_pre_attn_scalar=16, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(final_logit_softcapping=2.0, query_pre_attn_scalar=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
}


def logit_settings(keys) -> set[str]:
    """The config fields of a soft-cap or scale of the output logits (final_logit_softcapping, logit_scale,
    logits_scaling, ...; attention's attn_logit_softcapping acts inside the decoder)."""
    pattern = re.compile(r"logit.*(softcap|scal)|(softcap|scal).*logit")
    return {key for key in keys if pattern.search(key) and not key.startswith("attn")}


POST_PROCESSED = [kind for kind in FAMILIES if logit_settings(FEATURES.get(kind, {}))]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tiny(kind: str, vocab_size: int):
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, vocab_size=vocab_size, **COMMON, **FEATURES.get(kind, {}))
    model = AutoModelForCausalLM.from_config(config).eval()
    spread_logits(model)
    return model


def spread_logits(model):
    """Random init gives logits of about ±0.2, which a soft-cap of 2 leaves almost as they are: a larger head
    (logits of several units) makes the cap change every score, and the perplexity far from uniform."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)


def test_every_logit_setting_of_every_family_is_switched_on_here():
    """A family added to the table whose config has a logit soft-cap or scale gets it set in FEATURES."""
    for kind in FAMILIES:
        settings = logit_settings(AutoConfig.for_model(kind).to_dict())
        assert settings <= set(FEATURES.get(kind, {})), (kind, settings)
    assert POST_PROCESSED == ["gemma2", "gemma3_text"]


@pytest.mark.parametrize("kind", POST_PROCESSED)
def test_the_post_processed_families_differ_from_decoder_and_head(kind):
    """The premise of the tests below: on these models, decoder + output embedding alone is measurably wrong."""
    model = tiny(kind, 512)
    ids = torch.randint(1, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(ids).logits
        bare = model.get_output_embeddings()(model.get_decoder()(ids).last_hidden_state)
    assert own.abs().max() <= FEATURES[kind]["final_logit_softcapping"] < bare.abs().max() / 2


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(compress.data.load_text("wikitext2-test")[:4000])
    return path


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_perplexity_is_exp_of_the_models_own_loss(kind, tokenizer, text_file):
    model = tiny(kind, len(tokenizer))
    stream = token_stream(tokenizer, str(text_file))
    # one window: perplexity of tokens 1..63 given their full prefix
    ids = stream[None, :64]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    one = compress.perplexity(model, tokenizer, compress.Perplexity(dataset=str(text_file), seq_len=64, max_tokens=64),
                              show_progress=False)
    assert one["protocol"]["tokens_scored"] == 63
    assert one["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    # overlapping windows in batches of 3: each window's labels are its newly scored tokens, the rest -100
    nll, count = 0.0, 0
    for begin, end, n_new in _windows(70, 24, 10):
        window = stream[None, begin:end]
        labels = window.clone()
        labels[:, : -n_new] = -100
        with torch.no_grad():
            nll += model(window, labels=labels).loss.item() * n_new
        count += n_new
    protocol = compress.Perplexity(dataset=str(text_file), seq_len=24, stride=10, max_tokens=70, batch_size=3)
    windowed = compress.perplexity(model, tokenizer, protocol, show_progress=False)
    assert windowed["protocol"]["tokens_scored"] == count == 69
    assert windowed["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def _requests(vocab_size: int):
    """(strings, context tokens, answer tokens) of different lengths, in batches of 2: two answers sharing a context,
    an input that is a prefix of another one's, answers of one to four tokens."""
    draw = torch.Generator().manual_seed(3)

    def tokens(n):
        return torch.randint(1, vocab_size, (n,), generator=draw).tolist()

    a, b, c, d = tokens(12), tokens(5), tokens(20), tokens(9)
    pairs = [(a, [7]), (a, [9]), (a, [7, 11]), (a, tokens(3)), (b, tokens(2)), (c, [5]), (d, tokens(4)), (b, [3])]
    return [(("context", "answer"), context, answer) for context, answer in pairs]


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_answer_log_likelihoods_are_the_models_own(kind, tokenizer):
    model = tiny(kind, len(tokenizer))
    scorer = _scorer_class()(pretrained=model, tokenizer=tokenizer, batch_size=2)
    scorer.show_progress = False
    requests = _requests(len(tokenizer))
    got = scorer._loglikelihood_tokens(requests)
    for (_, context, answer), (value, greedy) in zip(requests, got):
        whole = torch.tensor([context + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(whole).logits[0].float(), dim=-1)[len(context) - 1 : -1]
        target = torch.tensor(answer)
        assert value == pytest.approx(logprobs.gather(1, target[:, None]).sum().item(), abs=1e-4, rel=1e-5)
        assert greedy == bool((logprobs.argmax(-1) == target).all())
