"""The `knexa-node` command line: thin wrappers over the daemon and its local API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from knexa.cli.kv import fuser_app
from knexa.net.identity import IdentityError, load_or_create_identity, peer_id_of
from knexa.net.version import KNEXA_VERSION
from knexa.node.config import DEFAULT_LISTEN, NodeConfig, default_data_dir

app = typer.Typer(
    name="knexa-node",
    help="knexa-node: a peer-to-peer runtime for collaborating edge LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:
    # Piped output goes to scripts and logs: never cut a table at 80 columns.
    console.width = 200

_DEFAULTS = NodeConfig()


def _help(text: str, default: object) -> str:
    # Help text is rich markup, which would take a bare "[default: ...]" for a style tag and drop it.
    return f"{text} \\[default: {default}]."


DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", "-d", help=_help("Node data directory", default_data_dir())),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=_help("TOML config file", "<data dir>/config.toml")),
]
Api = Annotated[str | None, typer.Option("--api", help=_help("Daemon API URL", "from the data dir"))]
Token = Annotated[
    str | None, typer.Option("--token", help=_help("API token", "KNEXA_API_TOKEN or <data dir>/api.token"))
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write("error: " + " ".join(message.split()) + "\n")
    raise typer.Exit(code)


def _config(data_dir: Path | None, config: Path | None, **overrides: Any):
    from knexa.node.config import ConfigError, load_config

    try:
        return load_config(config, data_dir, overrides)
    except ConfigError as exc:
        fail(str(exc), 2)


def _client(data_dir: Path | None, config: Path | None, api: str | None, token: str | None):
    from knexa.cli.client import ApiClient

    return ApiClient(_config(data_dir, config), api, token)


def _call(client: Any, method: str, path: str, timeout_s: float, body: dict[str, Any] | None = None) -> Any:
    from knexa.cli.client import ApiError

    try:
        return client.request(method, path, timeout_s, body)
    except ApiError as exc:
        fail(str(exc))


def _get(client: Any, path: str) -> Any:
    return _call(client, "GET", path, 5.0)


def _post(client: Any, path: str, body: dict[str, Any], timeout_s: float = 60.0) -> Any:
    return _call(client, "POST", path, timeout_s, body)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command()
def start(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    listen: Annotated[
        list[str] | None,
        typer.Option("--listen", "-l", help=_help("Multiaddr to listen on (repeatable)", DEFAULT_LISTEN)),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", "-b", help="Bootstrap peer multiaddr with /p2p/<id> (repeatable)."),
    ] = None,
    api_host: Annotated[str | None, typer.Option(help=_help("Local API interface", _DEFAULTS.api_host))] = None,
    api_port: Annotated[int | None, typer.Option(help=_help("Local API port, 0 for any", _DEFAULTS.api_port))] = None,
    log_level: Annotated[
        str | None, typer.Option(help=_help("debug, info, warning or error", _DEFAULTS.log_level))
    ] = None,
    ping_interval: Annotated[
        float | None, typer.Option(help=_help("Seconds between pings", _DEFAULTS.ping_interval_s))
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help=_help("'embedded' (the shipped SmolLM2), a model folder or 'none'", _DEFAULTS.model)),
    ] = None,
    device: Annotated[str | None, typer.Option(help=_help("auto, cpu, cuda or cuda:N", _DEFAULTS.device))] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help=_help("auto, float32, bfloat16 or float16; peers check each other only at the same dtype",
                                _DEFAULTS.dtype)),
    ] = None,
    dht_mode: Annotated[
        str | None,
        typer.Option(help=_help("auto (client once AutoNAT says private), server, client", _DEFAULTS.dht_mode)),
    ] = None,
    reachability: Annotated[
        str | None, typer.Option(help=_help("auto (AutoNAT decides), public or private", _DEFAULTS.reachability))
    ] = None,
    relay_service: Annotated[
        str | None,
        typer.Option(help=_help("Serve as a circuit relay: auto (once public), on, off", _DEFAULTS.relay_service)),
    ] = None,
    relay: Annotated[
        list[str] | None, typer.Option("--relay", help="Relay multiaddr with /p2p/<id> to reserve on (repeatable).")
    ] = None,
    max_relays: Annotated[
        int | None, typer.Option(help=_help("Reservations a private node holds", _DEFAULTS.max_relays))
    ] = None,
    hole_punch: Annotated[
        str | None, typer.Option(help=_help("DCUtR hole punching: on or off", _DEFAULTS.hole_punch))
    ] = None,
    relay_max_reservations: Annotated[
        int | None, typer.Option(help=_help("As a relay: reservations held at once", _DEFAULTS.relay_max_reservations))
    ] = None,
    relay_reservation_ttl: Annotated[
        int | None,
        typer.Option(help=_help("As a relay: reservation lifetime in seconds", _DEFAULTS.relay_reservation_ttl_s)),
    ] = None,
    relay_max_circuit_duration: Annotated[
        int | None,
        typer.Option(
            help=_help("As a relay: seconds one relayed connection may last", _DEFAULTS.relay_max_circuit_duration_s)
        ),
    ] = None,
    relay_max_circuit_bytes: Annotated[
        int | None,
        typer.Option(
            help=_help("As a relay: bytes one relayed connection may carry",
                       f"{_DEFAULTS.relay_max_circuit_bytes >> 20} MiB")
        ),
    ] = None,
) -> None:
    """Run the daemon in the foreground until SIGINT or SIGTERM."""
    import trio

    from knexa.node.daemon import Daemon, DaemonError, run_until_signal
    from knexa.node.errors import find_exception
    from knexa.node.logs import setup_logging

    cfg = _config(
        data_dir,
        config,
        listen=listen,
        bootstrap=bootstrap,
        api_host=api_host,
        api_port=api_port,
        log_level=log_level,
        ping_interval_s=ping_interval,
        model=model,
        device=device,
        dtype=dtype,
        dht_mode=dht_mode,
        reachability=reachability,
        relay_service=relay_service,
        relays=relay,
        max_relays=max_relays,
        hole_punch=hole_punch,
        relay_max_reservations=relay_max_reservations,
        relay_reservation_ttl_s=relay_reservation_ttl,
        relay_max_circuit_duration_s=relay_max_circuit_duration,
        relay_max_circuit_bytes=relay_max_circuit_bytes,
    )
    setup_logging(cfg.log_level)
    try:
        trio.run(run_until_signal, lambda: Daemon(cfg))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BaseException as exc:  # noqa: BLE001 - turn known failures into one line
        user_error = find_exception(exc, (DaemonError, IdentityError))
        if user_error is None:
            raise
        fail(str(user_error))


@app.command("id")
def id_(
    data_dir: DataDir = None,
    config: ConfigFile = None,
    api: Api = None,
    token: Token = None,
    json_: Json = False,
) -> None:
    """Print this node's peer id and its listen and observed addresses."""
    from knexa.cli.client import ApiClient, ApiError

    cfg = _config(data_dir, config)
    try:
        peer_id = str(peer_id_of(load_or_create_identity(cfg.data_dir)))
    except IdentityError as exc:
        fail(str(exc))
    try:
        node = ApiClient(cfg, api, token).get("/v1/node")
        running, listen, observed = True, node["listen_addrs"], node["observed_addrs"]
        relayed = (node.get("nat") or {}).get("relay_addrs", [])
    except ApiError:
        running, listen, observed, relayed = False, cfg.listen, [], []
    if json_:
        _print_json({"peer_id": peer_id, "running": running, "listen_addrs": listen, "observed_addrs": observed,
                     "relay_addrs": relayed})
        return
    console.print(peer_id, highlight=False)
    note = "" if running else " (configured; the daemon is not running)"
    console.print(f"listen{note}:", highlight=False)
    for addr in listen:
        console.print(f"  {addr}", highlight=False)
    if running:
        console.print("observed:" if observed else "observed: none yet", highlight=False)
        for addr in observed:
            console.print(f"  {addr}", highlight=False)
        if relayed:
            console.print("through relays (from behind a NAT):", highlight=False)
            for addr in relayed:
                console.print(f"  {addr}", highlight=False)


@app.command()
def peers(
    data_dir: DataDir = None, config: ConfigFile = None, api: Api = None, token: Token = None, json_: Json = False
) -> None:
    """Show the peers this node is connected to, then the rest of the mesh its ledger knows."""
    from knexa.cli.render import print_peers

    client = _client(data_dir, config, api, token)
    listing = _get(client, "/v1/peers")
    if json_:
        _print_json(listing["peers"])  # the connected peers: the known ones are in the API's "known"
        return
    print_peers(console, _get(client, "/v1/node"), listing["peers"], listing.get("known", []))


@app.command()
def status(
    data_dir: DataDir = None, config: ConfigFile = None, api: Api = None, token: Token = None, json_: Json = False
) -> None:
    """Summarise the running node."""
    from knexa.cli.render import print_status

    node = _get(_client(data_dir, config, api, token), "/v1/node")
    if json_:
        _print_json(node)
        return
    print_status(console, node)


@app.command()
def connect(
    addr: Annotated[str, typer.Argument(help="Multiaddr with /p2p/<id>; a /p2p-circuit one goes via its relay.")],
    data_dir: DataDir = None, config: ConfigFile = None, api: Api = None, token: Token = None, json_: Json = False,
) -> None:
    """Connect the running node to a peer, directly or through a relay."""
    result = _post(_client(data_dir, config, api, token), "/v1/connect", {"addr": addr})
    if json_:
        _print_json(result)
        return
    if result.get("already_connected"):
        console.print(f"already connected to {result['peer_id']}; {addr} was not dialled", highlight=False)
        return
    console.print(f"connected to {result['peer_id']} ({result['via']}) in {result['seconds'] * 1000:.0f} ms",
                  highlight=False)


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The question.")],
    peer: Annotated[str | None, typer.Option(help="Run it on this peer's engine over signed RPC.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Most tokens in the answer.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    adapter: Annotated[str | None, typer.Option(help="A loaded LoRA adapter id.")] = None,
    collab: Annotated[
        str | None, typer.Option(help="Collaborate across the mesh: moa (mixture of agents), vote or kv (KV caches).")
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="kv: rephrase first; only the rephrasing leaves this node.")
    ] = False,
    agents: Annotated[int, typer.Option("-k", "--agents", min=1, max=16, help="moa: peers asked per layer.")] = 2,
    layers: Annotated[int, typer.Option("-M", "--layers", min=1, max=8, help="moa: proposer layers.")] = 1,
    require: Annotated[
        str | None, typer.Option(help="vote: the task's requirement vector, e.g. math=1,reasoning=0.5.")
    ] = None,
    executors: Annotated[int, typer.Option(min=1, max=16, help="vote: how many nodes execute.")] = 3,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    api: Api = None,
    token: Token = None,
    json_: Json = False,
) -> None:
    """Ask the node's model (or a peer's, or several peers' together with --collab); the answer prints as it
    streams (a collaborative answer prints when it is complete, followed by who contributed)."""
    from knexa.cli.client import ApiError

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {
        "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "adapter": adapter, "peer": peer
    }
    client = _client(data_dir, config, api, token)
    if collab == "kv":
        from knexa.cli.kv import ask_kv

        ask_kv(client, prompt, max_tokens, private, json_)
        return
    if collab is not None:
        _ask_collab(client, collab, messages, agents, layers, require, executors, max_tokens, temperature, json_)
        return
    try:
        for event in client.stream_chat(body):
            for choice in event.get("choices", []):
                sys.stdout.write(choice.get("delta", {}).get("content") or "")
                sys.stdout.flush()
    except ApiError as exc:
        sys.stdout.write("\n")
        fail(str(exc))
    sys.stdout.write("\n")


def _ask_collab(
    client: Any, mode: str, messages: list[dict[str, str]], k: int, m: int, require: str | None, executors: int,
    max_tokens: int, temperature: float, json_: bool,
) -> None:
    from knexa.node.collab.vote import parse_requirement

    if mode not in ("moa", "vote"):
        fail(f"--collab must be moa, vote or kv, not {mode!r}", 2)
    try:
        requirement = parse_requirement(require or "")
    except ValueError as exc:
        fail(f"--require: {exc}", 2)
    body = {
        "mode": mode, "messages": messages, "k": k, "m": m, "executors": executors, "requirement": requirement,
        "max_tokens": max_tokens, "temperature": temperature,
    }
    result = _post(client, "/v1/collab/ask", body, timeout_s=600.0)
    if json_:
        _print_json(result)
        return
    sys.stdout.write(result["text"].strip() + "\n")
    who = ", ".join(p[:12] + "…" for p in result["contributors"])
    if mode == "moa":
        shrunk = f" (lowered from K={result['k_requested']}, M={result['m_requested']})" if result["degraded"] else ""
        sys.stderr.write(f"(mixture of agents K={result['k']} M={result['m']}{shrunk}; contributors: {who}; "
                         f"{len(result['missed'])} missed; {result['elapsed_s']:.1f}s)\n")
    else:
        sys.stderr.write(f"(weighted vote: {result['answer']!r} with {result['totals'][result['answer']]:.2f} of "
                         f"{sum(result['totals'].values()):.2f}; executors: {who}; {result['elapsed_s']:.1f}s)\n")


app.add_typer(fuser_app, name="fuser")


@app.command()
def learn(
    data: Annotated[Path | None, typer.Option(help="JSONL file of {\"prompt\", \"answer\", \"category\"?} "
                                                   "lines; it never leaves this node.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Return when local training is done.")] = False,
    leave: Annotated[bool, typer.Option("--leave", help="Take part in no more rounds; the adapter keeps "
                                                        "serving (--data joins again).")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    api: Api = None,
    token: Token = None,
    json_: Json = False,
) -> None:
    """Train this node's LoRA adapter on private data, then take part in distillation rounds with peers
    (with neither --data nor --leave: where learning stands)."""
    from knexa.cli.learn import learn_body, print_learn

    if leave and data is not None:
        fail("give either --data FILE (learn and join the rounds) or --leave, not both", code=2)
    client = _client(data_dir, config, api, token)
    if leave:
        result = _call(client, "DELETE", "/v1/learn", 60.0)
    elif data is None:
        result = _get(client, "/v1/learn")
    else:
        result = _post(client, "/v1/learn", learn_body(data, wait), timeout_s=3600.0 if wait else 60.0)
    if json_:
        _print_json(result)
        return
    if leave:
        console.print("left the distillation rounds; the adapter keeps serving", highlight=False)
    elif result.get("started"):
        console.print("local training started; `knexa-node rounds` shows the rounds", highlight=False)
    print_learn(console, result)


@app.command()
def rounds(
    explain: Annotated[bool, typer.Option("--explain", help="Show the matchmaker's score and uncertainty "
                                                           "for every possible pair.")] = False,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    api: Api = None,
    token: Token = None,
    json_: Json = False,
) -> None:
    """Distillation rounds: pairs, rewards and gains (from the shared matchmaker state in the ledger)."""
    from knexa.cli.learn import print_rounds

    view = _get(_client(data_dir, config, api, token), f"/v1/learn/rounds?explain={'true' if explain else 'false'}")
    if json_:
        _print_json(view)
        return
    print_rounds(console, view, explain)


@app.command("example-data")
def example_data(
    out: Annotated[Path, typer.Argument(help="JSONL file to write, for `learn --data`.")],
    node: Annotated[int, typer.Option(min=0, help="Which node's slice (0 .. nodes-1).")] = 0,
    nodes: Annotated[int, typer.Option(min=1, max=256, help="How many nodes the family is dealt to.")] = 4,
    family: Annotated[str, typer.Option(help="learnable or hard (see the distillation benchmark).")
                      ] = _DEFAULTS.learn_task_family,
    per_category: Annotated[int, typer.Option(min=1, max=10_000, help="Examples of each category in all.")] = 80,
    dirichlet: Annotated[float, typer.Option(min=0.01, help="Skew of the slices: smaller, more skewed.")] = 0.5,
    seed: Annotated[int, typer.Option(help="The same seed gives every node a slice of the same deal.")] = 0,
) -> None:
    """Write one node's skewed slice of the built-in task family (arithmetic, units, strings, dates), to try
    `learn` across a mesh: give each node its own --node with the same --nodes and --seed."""
    from knexa.node.learn import tasks

    if family not in tasks.FAMILIES:
        fail(f"--family must be one of {', '.join(tasks.FAMILIES)}", code=2)
    if node >= nodes:
        fail(f"--node must be below --nodes ({nodes})", code=2)
    examples = tasks.dirichlet_slices(nodes, per_category, dirichlet, seed, family)[node]
    try:
        tasks.write_jsonl(out, examples)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    counts = ", ".join(f"{c} {sum(e.category == c for e in examples)}" for c in tasks.CATEGORIES)
    console.print(f"wrote {len(examples)} examples to {out} ({counts})", highlight=False)
    if family != _DEFAULTS.learn_task_family:
        # The mesh's transfer prompts and the shared validation set must be of the data's family.
        console.print(f"the nodes' config needs learn_task_family = \"{family}\"", highlight=False)


find_app = typer.Typer(help="Find models and peers through the DHT.", no_args_is_help=True)
app.add_typer(find_app, name="find")


@find_app.command("model")
def find_model(
    name: Annotated[str, typer.Argument(help="Model name or weights hash.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    api: Api = None,
    token: Token = None,
    json_: Json = False,
) -> None:
    """Peers that serve a model."""
    from urllib.parse import quote

    found = _get(_client(data_dir, config, api, token), f"/v1/find/model/{quote(name, safe='')}")
    if json_:
        _print_json(found)
        return
    providers = found["providers"]
    console.print(f"{len(providers)} provider(s) of {name} ({found['ms']:.0f} ms)", highlight=False)
    for provider in providers:
        console.print(f"  {provider['peer_id']}  {' '.join(provider['addrs'][:2])}", highlight=False)


@find_app.command("peer")
def find_peer(
    peer_id: Annotated[str, typer.Argument(help="The peer id.")],
    data_dir: DataDir = None,
    config: ConfigFile = None,
    api: Api = None,
    token: Token = None,
    json_: Json = False,
) -> None:
    """A peer's addresses."""
    found = _get(_client(data_dir, config, api, token), f"/v1/find/peer/{peer_id}")
    if json_:
        _print_json(found)
        return
    console.print(f"{found['peer_id']} ({found['ms']:.0f} ms)", highlight=False)
    for addr in found["addrs"]:
        console.print(f"  {addr}", highlight=False)


@app.command()
def ledger(
    peer: Annotated[str | None, typer.Option("--peer", help="Only entries authored by this peer id.")] = None,
    data_dir: DataDir = None,
    config: ConfigFile = None,
    api: Api = None,
    token: Token = None,
    json_: Json = False,
) -> None:
    """Show the capability ledger as this node holds it."""
    from knexa.cli.render import ledger_table

    path = "/v1/ledger" + (f"?peer={peer}" if peer else "")
    listing = _get(_client(data_dir, config, api, token), path)
    if json_:
        _print_json(listing)
        return
    stats = listing["stats"]
    rejected = sum(stats["rejected"].values())
    console.print(
        f"{stats['entries']} entries · {stats['accepted']} accepted · {rejected} rejected "
        f"({', '.join(f'{k} {v}' for k, v in stats['rejected'].items()) or 'none'}) · "
        f"{stats['syncs_ok']} syncs",
        highlight=False,
    )
    if listing["entries"]:
        console.print(ledger_table(listing["entries"]))


@app.command()
def testnet(
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=2, max=32, help="How many daemons.")] = 3,
    keep: Annotated[bool, typer.Option(help="Keep the mesh running until Ctrl-C.")] = False,
    base_dir: Annotated[
        Path | None, typer.Option(help=_help("Where the nodes' data dirs go", "a temporary dir"))
    ] = None,
    model: Annotated[str, typer.Option(help="Each node's model: 'embedded', a folder, or 'none'.")] = "embedded",
) -> None:
    """Start a local mesh of daemons on loopback, wait until they all see each other, show it."""
    from knexa.node.testnet import TestnetError, run_testnet

    try:
        run_testnet(nodes, keep=keep, base_dir=base_dir, console=console, model=model)
    except TestnetError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"knexa-node {KNEXA_VERSION}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
