"""Chat data: assistant-only loss masks with SmolLM2's real chat template, and bad records."""

import pytest

from ftjax import config, data, hf

CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
  return hf.load_tokenizer(smollm2_dir)


def _cfg(**overrides):
  return config.load(None, ["model.path=m", "data.train=t", "data.format=chat", "data.seq_len=128"]
                     + [f"{k}={v}" for k, v in overrides.items()]).data


def _expected(tokenizer, pieces):
  """Token ids and mask from hand-written (text, trained) pieces of the rendered conversation."""
  tokens, mask = [], []
  for text, trained in pieces:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens += ids
    mask += [int(trained)] * len(ids)
  return tokens, mask


@pytest.mark.smollm2
@pytest.mark.parametrize("turns", ["all", "last"])
def test_chat_mask_trains_assistant_turns_through_end_of_turn(tokenizer, turns):
  (ex,) = data.tokenize([{"messages": CONVERSATION}], _cfg(**{"data.assistant_turns": turns}),
                        tokenizer, "mem")
  want_tokens, want_mask = _expected(tokenizer, [
      ("<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
       "<|im_start|>assistant\n", False),
      ("Hello!<|im_end|>", turns == "all"),
      ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
      ("4<|im_end|>", True),
      ("\n", False),
  ])
  assert ex.tokens.tolist() == want_tokens
  assert ex.loss_mask.tolist() == want_mask
  # the eval prompt ends with the generation prompt of the last assistant turn
  assert tokenizer.decode(ex.tokens[:ex.prompt_len]).endswith(
      "2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("record,needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "record 2 has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]},
     "record 2 message 1 has unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "record 2 message 1 needs a string 'content'"),
    ({"messages": []}, "record 2 field 'messages' is missing or not a non-empty list"),
    ({"text": "hello"}, "record 2 field 'messages' is missing"),
])
def test_bad_chat_records_name_the_record(record, needle, tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>"
                       "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
  good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
  with pytest.raises(config.UserError, match=needle):
    data.tokenize([good, record], _cfg(), tok, "chat.jsonl")


def test_chat_needs_a_template(tiny_llama_dir):
  tok = hf.load_tokenizer(tiny_llama_dir)
  tok.chat_template = None
  with pytest.raises(config.UserError, match="the tokenizer has no chat template"):
    data.tokenize([{"messages": CONVERSATION}], _cfg(), tok, "chat.jsonl")
