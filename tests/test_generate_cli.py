"""`hetero generate`: tokens from a zoo model and from a saved checkpoint folder, against eager greedy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hetero import zoo
from hetero.cli import main
from hetero.commands.generate import Generation, Sampling, generate, next_tokens, parse_ids

# Every compiled run: the accel on the CPU, partitions run eagerly (the compile is then seconds).
FAST = ["-O", "accel=cpu", "-O", "partition_compiler=eager"]
SUMMARY = ("load ", "compile ", "prefill ", "decode ", "peak RSS", "accel (cpu)", "fallbacks")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-tiny in fp32, saved in shards: greedy tokens then leave no near-tie to rounding."""
    path = tmp_path_factory.mktemp("llama-tiny")
    zoo.build("llama-tiny", dtype=torch.float32).model.save_pretrained(path, max_shard_size="200KB")
    return path


@pytest.fixture(scope="module")
def folder_with_tokenizer(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint with a word-level tokenizer: token i is the word 'w<i>' (built here, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("llama-tiny-tok")
    shutil.copytree(folder, path, dirs_exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(path)
    return path


def eager_greedy(folder: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens of transformers' own model from the folder, the whole sequence recomputed each step
    (no cache): a reference that shares nothing with the command's loop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, len(prompts[0]) :].tolist()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_zoo_model_batch_of_two_streams_ids_then_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["generate", "zoo:qwen3-moe-tiny", "--max-new-tokens", "6", "--batch", "2", "--ignore-eos", *FAST]
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    first, second = _lines(out)[:2]
    assert first.startswith("[0] 1 2 3 4 | ") and len(first.split("|")[1].split()) == 6
    assert second == "[1]" + first.removeprefix("[0]")  # one prompt, twice, greedy: the same tokens
    assert "batch 2" in out and "tok/s per request" in out and "tok/s total" in out
    assert all(word in out for word in SUMMARY), out
    assert "moe" in out  # the MoE layers' placement is named


def test_folder_with_ids_greedy_equals_eager(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two requests of one length from a saved folder; each request's tokens are eager's greedy ones."""
    code = main(["generate", str(folder), "--ids", "5,17,42,7;9,8,300,11", "--max-new-tokens", "6", *FAST])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    lines = _lines(out)
    assert lines[0].startswith("[0] 5 17 42 7 | ") and lines[1].startswith("[1] 9 8 300 11 | ")
    got = [[int(t) for t in line.split("|")[1].split()] for line in lines[:2]]
    eos = 2  # llama's generation config: a request ends with its EOS, which the command prints
    want = [
        w[: w.index(eos) + 1] if eos in w else w
        for w in eager_greedy(folder, [[5, 17, 42, 7], [9, 8, 300, 11]], 6)
    ]
    assert got == want
    assert "float32" in out and "batch 2" in out and "hetero.load_pretrained" in out
    assert all(word in out for word in SUMMARY), out


def test_folder_with_tokenizer_reads_the_prompt_and_streams_text(
    folder_with_tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "generate",
            str(folder_with_tokenizer),
            "--prompt",
            "w5 w17 w42",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            *FAST,
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    (want,) = eager_greedy(folder_with_tokenizer, [[5, 17, 42]], 5)
    special = {0, 1, 2}  # the tokenizer's <unk>, <s>, </s>: not printed
    assert _lines(out)[0] == "w5 w17 w42" + "".join(f" w{t}" for t in want if t not in special)


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{")
    cases = [
        (["generate", str(tmp_path / "bad")], "has tokenizer files but transformers cannot load them"),
        (["generate", str(tmp_path / "nope")], "no such folder"),
        (["generate", str(tmp_path)], "no *.safetensors files"),
        (["generate", "zoo:lama-tiny"], "did you mean 'llama-tiny'"),
        (["generate", "zoo:llama-tiny", "--prompt", "hello"], "has no tokenizer"),
        (["generate", "zoo:llama-tiny", "--ids", "1,2;3"], "of one length"),
        (["generate", "zoo:llama-tiny", "--ids", "1,2,512"], "outside the model's vocabulary"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert message in err and "Traceback" not in err, (argv, err)
        assert out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ids", "1,x"], "--ids wants token ids"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be 1 or more"),
        (["--top-p", "0"], "--top-p"),
        (["--prompt", "a", "--ids", "1"], "not allowed with"),
        (["-O", "nosuch=1"], "unknown option 'nosuch'"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "zoo:llama-tiny", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "hetero generate zoo:deepseek-v3-tiny" in out and "--temperature" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "generate tokens with a compiled checkpoint folder" in out and "hetero generate zoo:" in out


def test_the_loop_stops_each_request_at_its_eos() -> None:
    """generate() with a stand-in model: request 0 says 7, 3 (EOS), ...; request 1 says 7, 7, 7, ..."""
    script = [[7, 7], [3, 7], [9, 7], [9, 3]]

    def call(forward: object, ids: torch.Tensor, cache: list[int]) -> torch.Tensor:
        cache.append(ids.shape[1])
        logits = torch.zeros(2, 16)
        logits[torch.arange(2), torch.tensor(script[len(cache) - 1])] = 1.0
        return logits

    streamed: list[list[int]] = []
    done = generate(
        None,
        call,
        torch.zeros(2, 5, dtype=torch.long),
        list,
        10,
        eos=frozenset({3}),
        on_tokens=lambda t: streamed.append(t.tolist()),
    )
    assert isinstance(done, Generation)
    assert done.lengths == [2, 4] and streamed == script and done.tokens.shape == (2, 4)
    assert len(done.step_s) == 3 and done.compiled == []


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = next_tokens(logits, Sampling(), None)
    assert torch.equal(greedy, logits.argmax(-1))
    # A nucleus of almost nothing is the most likely token alone.
    assert torch.equal(next_tokens(logits, Sampling(1.0, 1e-6), torch.Generator().manual_seed(1)), greedy)

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([next_tokens(logits, Sampling(2.0, 0.9), g) for _ in range(20)])

    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))
    probs = torch.softmax(logits / 2.0, -1)
    ranked = probs.sort(-1, descending=True)
    for row in range(3):  # every draw lies in the smallest set of tokens holding 90% of the mass
        k = int((ranked.values[row].cumsum(0) < 0.9).sum()) + 1
        assert set(draw(5)[:, row].tolist()) <= set(ranked.indices[row, :k].tolist())


def test_parse_ids() -> None:
    assert parse_ids("1,2,3") == [[1, 2, 3]]
    assert parse_ids("1, 2;3,4") == [[1, 2], [3, 4]]
    with pytest.raises(ValueError):
        parse_ids("1,;")
