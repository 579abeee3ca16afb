"""Loading: the auto class per architecture, loader keyword arguments, nnsight's lazy (meta) models."""

import warnings

import pytest
import torch
import transformers as tf

from headscope.errors import HeadscopeError
from headscope.hf.loading import auto_class as _auto_class
from headscope.model import HeadModel
from headscope.zoo import organism_path


@pytest.mark.parametrize(
    "config, auto",
    [
        (tf.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64,
                     architectures=["T5ForConditionalGeneration"]), tf.AutoModelForSeq2SeqLM),
        (tf.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
                       architectures=["BartForConditionalGeneration"]), tf.AutoModelForSeq2SeqLM),
        (tf.T5Config(num_layers=1), tf.AutoModelForSeq2SeqLM),  # no architectures: encoder-decoder
        (tf.LlavaConfig(architectures=["LlavaForConditionalGeneration"]), tf.AutoModelForImageTextToText),
        (tf.LlamaConfig(architectures=["LlamaForCausalLM"]), tf.AutoModelForCausalLM),
        (tf.BertConfig(architectures=["BertModel"]), tf.AutoModel),
    ],
)
def test_auto_class_follows_the_architecture(config, auto):
    assert _auto_class(config) is auto


def test_text_conditional_generation_loads_as_seq2seq(tmp_path):
    config = tf.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64,
                         decoder_start_token_id=0)
    tf.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    try:
        hm = HeadModel.load(tmp_path)
    except HeadscopeError as exc:  # until T5's attention adapter exists: the adapter error, not the auto-class wall
        assert "cannot find the attention layers of T5ForConditionalGeneration" in str(exc)
    else:
        assert type(hm.model).__name__ == "T5ForConditionalGeneration"


def test_load_passes_attn_implementation():
    hm = HeadModel.load("retrieval", attn_implementation="eager")
    assert hm.model.config._attn_implementation == "eager"
    ids = torch.tensor([hm.tokenizer("The secret number")["input_ids"]])
    with torch.no_grad():
        base = hm.model(ids).logits
        with hm.ablate([(1, 5)]):
            edited = hm.model(ids).logits
        after = hm.model(ids).logits
    assert (edited - base).abs().max() > 1e-3 and torch.equal(after, base)
    assert hm.model.config._attn_implementation == "eager"  # restored on exit


@pytest.fixture
def lazy_lm():
    nnsight = pytest.importorskip("nnsight")
    path = str(organism_path("retrieval"))
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight 0.8 marks LanguageModel deprecated in favour of TransformersModel
        lm = nnsight.LanguageModel(path, tokenizer=tokenizer)
    assert not lm.dispatched and next(lm.__dict__["_module"].parameters()).is_meta  # lazy: built on the meta device
    return lm


def test_head_model_binds_a_lazy_nnsight_model_to_its_real_weights(lazy_lm):
    hm = HeadModel(lazy_lm)
    assert lazy_lm.dispatched and not next(hm.model.parameters()).is_meta
    assert hm.model is lazy_lm.__dict__["_module"] and hm.tokenizer is lazy_lm.tokenizer
    prompt = "The secret number of the red fox is 4821 . What is the secret number of the red fox ?"
    with torch.no_grad():
        with lazy_lm.trace(prompt):
            base = lazy_lm.output.logits.save()
        with hm.ablate([(1, 5), (1, 4), (1, 6)]), lazy_lm.trace(prompt):
            edited = lazy_lm.output.logits.save()
        ids = torch.tensor([hm.tokenizer(prompt)["input_ids"]])
        with hm.ablate([(1, 5), (1, 4), (1, 6)]):
            reference = hm.model(ids).logits
    assert (edited - base).abs().max() > 0.1  # the edit reached the modules nnsight ran
    torch.testing.assert_close(edited, reference, atol=1e-5, rtol=1e-5)


def test_meta_device_model_is_refused():
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   num_key_value_heads=2, intermediate_size=64, vocab_size=32))
    hm = HeadModel(model)  # geometry is readable without weights
    assert hm.geometry.n_heads == 2
    with pytest.raises(HeadscopeError, match="meta device"):
        with hm.ablate([(0, 1)]):
            pass
    assert not hm.hooks_installed()


@pytest.mark.xfail(strict=True, reason="nnsight 0.8.1 + transformers 5.24: nnsight reads the pipeline's "
                   "_load_tokenizer flag off check_task()['impl'], which transformers 5.24 stores as a dotted string, "
                   "so the lazy (meta) build passes the pipeline no tokenizer source: 'Impossible to guess which "
                   "tokenizer to use' for any folder. Not our tokenizer files; pass tokenizer=.")
def test_language_model_without_tokenizer_argument():
    nnsight = pytest.importorskip("nnsight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(str(organism_path("retrieval")))
    assert lm.tokenizer is not None
