"""The decoding loop: greedy and sampled generation, its statistics, and `skimformer generate`."""
import json

import numpy as np
import pytest

from skimformer import UserError
from skimformer.backends.generation import Sampling
from skimformer.cli.main import main

PROMPT = [5, 9, 14, 7, 3]


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine()


def test_top_k_of_one_is_greedy_and_a_seed_repeats_a_sample(engine):
    greedy = engine.generate([PROMPT], 8)
    assert engine.generate([PROMPT], 8, sampling=Sampling(temperature=1.0, top_k=1, seed=3)).tolist() == greedy.tolist()
    hot = Sampling(temperature=5.0, seed=7)
    first = engine.generate([PROMPT], 8, sampling=hot)
    assert engine.generate([PROMPT], 8, sampling=Sampling(temperature=5.0, seed=7)).tolist() == first.tolist()
    assert first.tolist() != greedy.tolist()  # at this temperature a sample differs from greedy


def test_stats_count_the_cache_held_after_the_last_step(engine):
    result = engine.generate_with_stats([PROMPT], 4)
    layers, heads, head_dim = 2, 2, 16  # the tiny Llama; the cache holds the prompt and 3 fed-back tokens
    assert result.steps == 3 and result.ids.shape == (1, 4)
    assert result.kv_cache_bytes == layers * 2 * heads * (len(PROMPT) + 3) * head_dim * 4
    assert result.tokens_per_s > 0


def test_bad_generation_arguments_are_refused(engine):
    with pytest.raises(UserError, match="max_new_tokens"):
        engine.generate([PROMPT], 0)
    with pytest.raises(UserError, match="top_p"):
        Sampling(top_p=0)
    with pytest.raises(UserError, match="attention_mask"):
        engine.generate([PROMPT], 2, attention_mask=[[1, 1]])


def test_generate_command_prints_ids_and_cache_bytes(engine, capsys):
    code = main(["generate", str(engine.folder), "--prompt-ids", ",".join(map(str, PROMPT)),
                 "--max-new-tokens", "6", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["ids"] == engine.generate([PROMPT], 6)[0].tolist()
    assert out["kv_cache_bytes"] > 0 and out["tokens_per_s"] > 0


def test_generate_command_needs_a_tokenizer_for_text(engine, capsys):
    code = main(["generate", str(engine.folder), "--prompt", "Once upon a time"])
    err = capsys.readouterr().err
    assert code == 2 and "--prompt-ids" in err and len(err.strip().splitlines()) == 1
    assert np.asarray(engine.generate([PROMPT], 1)).shape == (1, 1)
