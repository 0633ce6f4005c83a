"""`fastdecode train` end to end on a tiny random-weight model: answers, features, training, files.

The heads are replaced by a stand-in that follows the head contract (fastdecode.heads): layers,
config(), loss(batch), evaluate(batch). It is a linear map from the last stored layer's state to
the draft vocabulary, trained against the target's top-k distribution, so its loss can fall.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from fastdecode import heads
from fastdecode.api import LLM
from fastdecode.cli import _parser, main
from fastdecode.errors import FastDecodeError
from fastdecode.models.config import ModelConfig
from fastdecode.runtime.sampling import SamplingParams
from fastdecode.tokenizer import TokenizerInfo
from fastdecode.train import command, distill, features, loop

from conftest import TEST_COST_CURVE, tiny_weights

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["Hello there.", "Tell me a story about a fox.", "What is two plus two?", "Name three colours.",
           "Why is the sky blue?", "Write a haiku.", "How do bees make honey?",
           "Say something kind.\u2028On a line of its own."]  # U+2028 is a line break to str.splitlines
# Two more prompts that a (made-up) Spec-Bench file holds: the first exactly, the second nearly.
IN_SPEC_BENCH = ["What is the boiling point of water?", "Please write a short poem about the sea at night with stars"]
SPEC_BENCH = [{"question_id": 1, "category": "qa", "turns": ["what is the BOILING point of water"]},
              {"question_id": 2, "category": "writing", "turns": ["Write a short poem about the sea at night with stars, please."]}]


def tiny_model_folder(folder: Path) -> Path:
    """A 4-layer random Llama with a byte-level tokenizer (256 bytes + 2 chat tokens) and a chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    TokenizerInfo(bos_token=None, eos_token="<|im_end|>", bos_id=None, eos_ids=[257],
                  chat_template=TEMPLATE).save(folder / "tokenizer_info.json")
    config = ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    save_file(tiny_weights(config, seed=1), str(folder / "model.safetensors"))
    return folder


def prompts_file(path: Path, texts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


class StandIn(torch.nn.Module):
    """A head by the contract: reads the last layer, predicts the next token over the draft vocabulary."""

    def __init__(self, model, draft_vocab: list[int], interrupt_at: int | None = None):
        super().__init__()
        self.layers = self.train_layers = (model.config.num_layers - 1,)
        self.register_buffer("draft_ids", torch.tensor(draft_vocab))
        self.position = torch.full((model.config.vocab_size,), -1, dtype=torch.long)  # token -> draft row
        self.position[self.draft_ids] = torch.arange(len(draft_vocab))
        self.proj = torch.nn.Linear(model.config.hidden_size, len(draft_vocab))
        self.calls, self.interrupt_at = 0, interrupt_at

    def config(self) -> dict:
        return {"kind": "standin", "layers": list(self.layers), "draft_vocab": len(self.draft_ids)}

    def _logits_and_target(self, batch):
        logits = self.proj(batch["hidden"][:, :, 0])
        rows = self.position[batch["top_ids"]]
        target = torch.zeros(logits.shape).scatter_add_(-1, rows.clamp(min=0), batch["top_probs"].float() * (rows >= 0))
        return logits, target

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of a step
        logits, target = self._logits_and_target(batch)
        mask = batch["mask"]
        loss = -(target * F.log_softmax(logits, -1)).sum(-1)[mask].mean()
        return loss, {}

    def evaluate(self, batch):
        logits, target = self._logits_and_target(batch)
        mask = batch["mask"]
        hit = (logits.argmax(-1) == target.argmax(-1))[mask].float().mean().item()
        return {"accept@1": hit, "mean_accept_len": 1 + hit}


# What command.execute needs of fastdecode.heads, with the stand-in as the only kind.
STAND_IN_HEADS = SimpleNamespace(HEAD_KINDS=("standin",), make_head=lambda kind, model, vocab: StandIn(model, vocab),
                                 save_head=heads.save_head, fingerprint=heads.fingerprint)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path / "cache"))  # cost curves, default run folders
    spec_bench = tmp_path / "spec_bench.jsonl"
    spec_bench.write_text("".join(json.dumps(q) + "\n" for q in SPEC_BENCH))
    monkeypatch.setenv("FASTDECODE_SPEC_BENCH", str(spec_bench))
    return tmp_path


@pytest.fixture
def tiny_llm(env):
    llm = LLM(str(tiny_model_folder(env / "tiny")), "float32")
    llm.engine.cost_curve = TEST_COST_CURVE
    return llm


def train_args(*argv: str):
    return _parser().parse_args(["train", *argv])


def test_distill_answers_every_prompt_and_resumes_where_it_stopped(tiny_llm, env):
    messages = [[{"role": "user", "content": t}] for t in PROMPTS]
    path = env / "answers.jsonl"
    first = distill.distill(tiny_llm, messages, path, max_new_tokens=12, sampled_share=0.5, temperature=0.7, seed=3)
    assert [a.index for a in first] == list(range(len(PROMPTS)))
    assert {a.sampled for a in first} == {True, False}  # both kinds at a share of one half
    for a in first:
        assert a.prompt_ids == tiny_llm.prompt_ids(messages[a.index])
        assert 1 <= len(a.answer_ids) <= 12 and a.finish in ("stop", "length")

    # An interruption: three answers missing, the last saved line torn in half.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][:20])
    again = distill.distill(tiny_llm, messages, path, max_new_tokens=12, sampled_share=0.5, temperature=0.7, seed=3)
    assert again == first  # greedy and seeded sampled answers come out the same
    assert len(path.read_text().splitlines()) == len(PROMPTS)
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_features_hold_the_targets_states_and_distribution(tiny_llm, env, monkeypatch):
    model = tiny_llm.engine.model
    messages = [[{"role": "user", "content": t}] for t in PROMPTS]
    answers = distill.distill(tiny_llm, messages, env / "answers.jsonl", 10, sampled_share=0.0, temperature=0.7, seed=0)
    sequences = [(a.prompt_ids + a.answer_ids, len(a.prompt_ids)) for a in answers]
    layers = (1, 2, 3)
    monkeypatch.setattr(features, "SHARD_SEQUENCES", 3)
    monkeypatch.setattr(features, "CHUNK_ROWS", 16)  # every sequence is read in chunks, some forwards shared
    assert min(len(ids) for ids, _ in sequences) > 16
    features.write_features(model, sequences, env / "features", layers, top_k=5)
    shards = sorted((env / "features").glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # An interrupted run lost its second shard: a rerun writes that one alone, the same as before.
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    shards[1].unlink()
    features.write_features(model, sequences, env / "features", layers, top_k=5)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((env / "features").glob("shard-*"))}
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert [after[k][1] == before[k][1] for k in sorted(before)] == [True, False, True]
    features.write_index(env / "features", layers, 5, sequences, ["train"] * 6 + ["held_out"] * 2, list(range(8)),
                         draft_vocab=list(range(258)))
    data = features.FeatureSet(env / "features", "train")
    assert len(data) == 6 and len(features.FeatureSet(env / "features", "held_out")) == 2

    batch = data.batch([0, 1], (3, 1))
    ids, prompt = sequences[1]
    T = max(len(sequences[0][0]), len(ids))
    assert batch["hidden"].shape == (2, T, 2, 32) and batch["top_ids"].shape == (2, T, 5)
    assert batch["tokens"][1, : len(ids)].tolist() == ids
    # The label rows: those whose next token is part of the answer, never padding.
    assert batch["mask"][1].nonzero().flatten().tolist() == list(range(prompt - 1, len(ids) - 1))
    # Each sequence alone through the target gives the stored states (bfloat16) and distribution.
    logits, hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)), capture=(3, 1))
    torch.testing.assert_close(batch["hidden"][1, : len(ids)], hidden.bfloat16().float())
    probs, top = logits.softmax(-1).topk(5)
    assert torch.equal(batch["top_ids"][1, : len(ids)], top)
    torch.testing.assert_close(batch["top_probs"][1, : len(ids)], probs, atol=1e-3, rtol=1e-3)
    # The answers are greedy, so at every label row the target's favourite is the answer's next token.
    rows = batch["mask"][1]
    assert torch.equal(batch["top_ids"][1, rows, 0], batch["tokens"][1, 1:][rows[:-1]])


def test_forwards_pack_short_sequences_and_chunk_long_ones(monkeypatch):
    monkeypatch.setattr(features, "CHUNK_ROWS", 10)
    forwards = features._pack([[0] * 3, [0] * 4, [0] * 25, [0] * 2, [0] * 10])
    assert forwards == [[(0, 0, 3), (1, 0, 4)], [(2, 0, 10)], [(2, 10, 10)], [(2, 20, 5), (3, 0, 2)], [(4, 0, 10)]]


def test_draft_vocabulary_is_the_most_frequent_tokens_and_eos():
    answers = [[5, 5, 5, 7, 7, 9], [7, 5, 3]]
    assert features.draft_vocabulary(answers, 3, eos_ids={20}, vocab_size=30) == [5, 7, 20]
    assert features.draft_vocabulary(answers, 5, eos_ids={20}, vocab_size=30) == [3, 5, 7, 9, 20]
    assert len(features.draft_vocabulary(answers, 100, eos_ids={20}, vocab_size=30)) == 30  # capped at the vocabulary


def test_batches_cover_every_sequence_once_within_the_token_budget():
    lengths = [5, 40, 12, 7, 33, 60, 8, 8, 21, 90]
    batches = loop.plan_batches(lengths, batch_tokens=64, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert all(len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1 for b in batches)
    assert batches == loop.plan_batches(lengths, 64, seed=1, epoch=0) != loop.plan_batches(lengths, 64, seed=1, epoch=1)


def _run_to_features(tiny_llm, env):
    """A small dataset on disk, through the command's own stages."""
    args = train_args("--model", "tiny", "--prompts-file", str(prompts_file(env / "p.jsonl")), "--prompts", "8",
                      "--max-new-tokens", "24", "--draft-vocab", "64")
    out = env / "run"
    record = command._start_folder(out, {"test": 1})
    train, held = command._prompts(tiny_llm, args, command.pr.file_prompts(args.prompts_file), out, record)
    answers = command._answers(tiny_llm, args, train + held, out, record)
    vocab = command._features(tiny_llm, args, answers, len(train), out, STAND_IN_HEADS)
    return out, vocab


def test_training_lowers_the_loss_and_resumes_exactly_after_ctrl_c(tiny_llm, env):
    out, vocab = _run_to_features(tiny_llm, env)
    data, held = features.FeatureSet(out / "features", "train"), features.FeatureSet(out / "features", "held_out")
    assert len(vocab) == 64 and 257 in vocab  # EOS is always a draft token
    settings = loop.TrainSettings(epochs=4, lr=3e-2, batch_tokens=128, seed=0)

    torch.manual_seed(0)
    straight = StandIn(tiny_llm.engine.model, vocab)
    result = loop.train(straight, data, held, settings, env / "straight.pt", "standin")
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert all(0 <= h["accept@1"] <= 1 and h["mean_accept_len"] == 1 + h["accept@1"] for h in history)
    steps_per_epoch = result["steps"] // 4

    torch.manual_seed(0)
    head = StandIn(tiny_llm.engine.model, vocab, interrupt_at=steps_per_epoch + 2)  # in epoch 2
    with pytest.raises(KeyboardInterrupt):
        loop.train(head, data, held, settings, env / "resumed.pt", "standin")
    saved = torch.load(env / "resumed.pt", weights_only=True)["state"]
    assert saved["step"] == steps_per_epoch + 2  # the interrupted step was finished, then saved
    torch.manual_seed(123)  # the checkpoint's random state takes over
    resumed = StandIn(tiny_llm.engine.model, vocab)
    again = loop.train(resumed, data, held, settings, env / "resumed.pt", "standin")
    assert again["history"] == history
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_the_command_writes_heads_and_cards_and_resumes(tiny_llm, env, capsys):
    model = str(env / "tiny")
    argv = ["--model", model, "--dtype", "float32", "--heads", "standin", "--prompts-file",
            str(prompts_file(env / "p.jsonl", PROMPTS + IN_SPEC_BENCH)), "--prompts", "8", "--max-new-tokens", "16",
            "--draft-vocab", "48", "--epochs", "2", "--batch-tokens", "256", "--lr", "1e-2"]
    assert command.execute(train_args(*argv), ["standin"], STAND_IN_HEADS) == 0
    out = command.default_folder(model)
    assert out == env / "cache" / "train" / "tiny"
    printed = capsys.readouterr()
    assert f"{out}/standin.safetensors" in printed.out and "--method standin" in printed.out
    assert str(out) in printed.err

    card = json.loads((out / "standin.json").read_text())
    assert card["kind"] == "standin" and card["layers"] == [3] and card["draft_vocab_size"] == 48
    assert card["target"]["model"] == model and len(card["target"]["sha256"]) == 64
    assert card["data"]["source"] == str(env / "p.jsonl") and card["data"]["train_prompts"] == 7
    assert card["data"]["held_out_prompts"] == 1 and card["data"]["spec_bench_dropped"] == {"exact": 1, "near": 1}
    chosen = [json.loads(line)["messages"][0]["content"] for line in (out / "prompts.jsonl").open()]
    assert sorted(chosen) == sorted(PROMPTS)
    assert card["training"]["epochs"] == 2 and card["training"]["steps"] > 0 and card["seed"] == 0
    assert [h["epoch"] for h in card["acceptance"]] == [1, 2]
    assert {"prompts", "answers", "features", "train standin"} <= set(card["wall_time_s"])
    with safe_open(str(out / "standin.safetensors"), framework="pt") as f:
        assert f.get_tensor("draft_ids").tolist() == json.loads((out / "features" / "index.json").read_text())["draft_vocab"]
        assert f.get_tensor("proj.weight").shape == (48, 32)

    with pytest.raises(FastDecodeError, match="holds a training run already"):
        command.execute(train_args(*argv), ["standin"], STAND_IN_HEADS)
    with pytest.raises(FastDecodeError, match=r"other settings: epochs \(2 there, 3 now\)"):
        command.execute(train_args(*argv, "--epochs", "3", "--resume"), ["standin"], STAND_IN_HEADS)

    answers = (out / "answers.jsonl").read_text()
    checkpoint_time = (out / "checkpoints" / "standin.pt").stat().st_mtime_ns
    assert command.execute(train_args(*argv, "--resume"), ["standin"], STAND_IN_HEADS) == 0
    assert (out / "answers.jsonl").read_text() == answers  # nothing asked again
    assert (out / "checkpoints" / "standin.pt").stat().st_mtime_ns == checkpoint_time  # nor trained again
    assert json.loads((out / "standin.json").read_text())["acceptance"] == card["acceptance"]

    assert command.execute(train_args(*argv, "--overwrite", "--seed", "1"), ["standin"], STAND_IN_HEADS) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 1


def test_answers_dataset_trains_on_the_sources_replies(tiny_llm, env):
    """--answers dataset: no answering; each answer is its reply in the tokens the chat template
    writes after the prompt, up to the end of the turn, cut at --max-new-tokens."""
    replies = {t: ("\n" if i == 0 else "") + f"Reply {i}: " + "abc " * (2 + 3 * i) for i, t in enumerate(PROMPTS)}
    path = env / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "reply": r}) + "\n" for t, r in replies.items())
                    + json.dumps({"prompt": "No reply here."}) + "\n")
    out = env / "run"
    argv = ["--model", str(env / "tiny"), "--dtype", "float32", "--heads", "standin", "--prompts-file", str(path),
            "--prompts", "20", "--max-new-tokens", "24", "--draft-vocab", "48", "--epochs", "1", "--answers", "dataset",
            "--out", str(out)]
    assert command.execute(train_args(*argv), ["standin"], STAND_IN_HEADS) == 0
    assert not (out / "answers.jsonl").exists()  # nothing was generated
    chosen = [json.loads(line) for line in (out / "prompts.jsonl").open()]
    assert sorted(c["messages"][0]["content"] for c in chosen) == sorted(PROMPTS)  # the reply-less prompt is not
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["dropped"]["no reply"] == 1 and run["data"]["sampled_answers"] == 0
    tok = tiny_llm.tokenizer
    answers = command._answers(tiny_llm, train_args(*argv), [command.pr.Prompt(c["id"], c["messages"], c["reply"]) for c in chosen],
                               out, {"data": {}})
    for c, answer in zip(chosen, answers):
        text = c["reply"].strip()
        whole = tok.encode_chat(c["messages"] + [{"role": "assistant", "content": text}], add_generation_prompt=False)
        assert answer.prompt_ids + answer.answer_ids == whole[: len(answer.prompt_ids) + len(answer.answer_ids)]
        assert tok.decode(answer.answer_ids).startswith(text[:20])
        if answer.finish == "stop":
            assert answer.answer_ids[-1] in tok.eos_ids and len(answer.answer_ids) <= 24
        else:
            assert len(answer.answer_ids) == 24
    assert {a.finish for a in answers} == {"stop", "length"}
    card = json.loads((out / "standin.json").read_text())
    assert card["data"]["answers"] == "the source's own replies" and "sampled_share" not in card["data"]

    no_replies = prompts_file(env / "q.jsonl")
    with pytest.raises(FastDecodeError, match="none of the 8 in .* has one"):
        command.execute(train_args(*argv[:-2], "--out", str(env / "run2"), "--prompts-file", str(no_replies)),
                        ["standin"], STAND_IN_HEADS)


def test_fastdecode_train_trains_the_real_heads_and_they_draft_losslessly(tiny_llm, env, capsys):
    """The CLI end to end with eagle, medusa and hydra: each head's loss falls, and the written file
    loads into its drafter, which then gives exactly plain decoding's output."""
    model, out = str(env / "tiny"), env / "run"
    assert main(["train", "--model", model, "--dtype", "float32", "--prompts-file", str(prompts_file(env / "p.jsonl")),
                 "--prompts", "8", "--max-new-tokens", "24", "--draft-vocab", "96", "--epochs", "3",
                 "--batch-tokens", "512", "--lr", "3e-3", "--out", str(out)]) == 0
    assert "--method eagle" in capsys.readouterr().out
    index = json.loads((out / "features" / "index.json").read_text())
    assert index["layers"] == [0, 1, 2, 3]  # eagle's three (all a 4-layer model has below its last) and the last
    for kind in heads.HEAD_KINDS:
        card = json.loads((out / f"{kind}.json").read_text())
        losses = [h["train_loss"] for h in card["acceptance"]]
        assert losses[-1] < losses[0], (kind, losses)
        assert card["config"]["kind"] == kind and card["draft_vocab_size"] == 96

    prompt = tiny_llm.prompt_ids([{"role": "user", "content": "Tell me about foxes."}])
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = tiny_llm.engine.generate(prompt, params, tiny_llm.drafter("ar"))
    for kind in heads.HEAD_KINDS:
        drafter = tiny_llm.drafter(kind, head=str(out / f"{kind}.safetensors"))
        result = tiny_llm.engine.generate(prompt, params, drafter)
        assert result.token_ids == plain.token_ids, kind
        assert result.stats.drafts > 0, kind  # it drafted, and what it drafted was verified


def test_init_fine_tunes_a_trained_head_in_its_draft_vocabulary(tiny_llm, env, capsys):
    """--init starts the head from the given file (not from the target's output head) and keeps the
    file's draft vocabulary; the card says where the head came from. At a learning rate of 1e-12 the
    result equals the file it started from (a fresh head's layer would start at zero, its output rows
    at the target's)."""
    model, first, second = str(env / "tiny"), env / "first", env / "second"
    common = ["train", "--model", model, "--dtype", "float32", "--heads", "eagle", "--max-new-tokens", "12",
              "--epochs", "1", "--batch-tokens", "512"]
    assert main([*common, "--prompts-file", str(prompts_file(env / "p.jsonl")), "--prompts", "4",
                 "--draft-vocab", "96", "--out", str(first)]) == 0
    start = first / "eagle.safetensors"
    assert main([*common, "--prompts-file", str(prompts_file(env / "q.jsonl", PROMPTS[4:] + PROMPTS[:2])),
                 "--prompts", "6", "--draft-vocab", "40", "--lr", "1e-12", "--init", str(start),
                 "--out", str(second)]) == 0
    with safe_open(str(start), framework="pt") as a, safe_open(str(second / "eagle.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            torch.testing.assert_close(b.get_tensor(name), a.get_tensor(name), atol=1e-9, rtol=1e-2, msg=name)
    assert len(json.loads((second / "features" / "index.json").read_text())["draft_vocab"]) == 96  # not 40
    card = json.loads((second / "eagle.json").read_text())
    assert card["initialised_from"]["sha256"] == heads.fingerprint(start)
    assert card["initialised_from"]["data"] == json.loads((first / "eagle.json").read_text())["data"]
    capsys.readouterr()

    for extra, message in [(["--heads", "medusa"], "holds a head of kind eagle, which --heads does not train"),
                           (["--init", str(start)], "names two eagle heads"),
                           (["--out", str(env / "x"), "--init", str(env / "none.safetensors")], "none.safetensors does not exist")]:
        argv = [*common, "--prompts-file", str(env / "p.jsonl"), "--prompts", "4", "--init", str(start),
                "--out", str(env / "third"), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
