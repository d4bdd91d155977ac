"""`make demo`: the whole product on this machine, as a user drives it, in one go.

Brings a deployment up with `tsctl up --local` (embedded Redis, virtual nodes of mixed declared GPU
types, SmolLM2-135M on the CPU reference engine as prefill and decode workers, the gateway), asks it a
question through the OpenAI client, takes a node away in the middle of a streamed answer
(`tsctl chaos preempt`), shows the answer finishing and the plan healing, then `tsctl down`.
Pass --keep to leave it running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import openai


def tsctl(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "tsctl", *args]
    print(f"\n$ tsctl {' '.join(args)}", flush=True)
    if capture:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    subprocess.run(cmd, check=True)
    return ""


def status(name: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "tsctl", "status", "-d", name, "--json", "--events", "200"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deployment", default="demo")
    p.add_argument("--engine-model", default="smollm2", help="smollm2 (real answers), tiny or emulated (fast)")
    p.add_argument("--keep", action="store_true", help="leave the deployment running at the end")
    args = p.parse_args()
    name = args.deployment
    home = os.environ.get("TS_HOME", os.path.expanduser("~/.thunderserve"))
    tsctl("up", "--local", "--budget", "2", "--engine-model", args.engine_model, "-d", name)
    dep = json.load(open(os.path.join(home, "deployments", name, "deployment.json")))
    client = openai.OpenAI(base_url=dep["gateway_url"] + "/v1", api_key=dep["api_key"], max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    try:
        question = "What is the capital of France? Answer in one sentence."
        print(f"\n>>> {question}")
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                max_tokens=24, temperature=0)
        print(f"<<< {answer.choices[0].message.content}")
        tsctl("status", "-d", name)

        snap = status(name)
        victim = next(r["node_ids"][0] for r in snap["replicas"] if r["role"] == "decode" and r["status"] == "ready")
        prompt = "Write a short poem about clouds and rain."
        print(f"\n>>> {prompt}   (streaming; node {victim}, serving decode, will be preempted mid-answer)\n<<< ",
              end="", flush=True)
        chunks: list[str] = []

        def preempt_soon() -> None:
            while len(chunks) < 6:
                time.sleep(0.05)
            subprocess.run([sys.executable, "-m", "tsctl", "chaos", "preempt", victim, "-d", name], check=True,
                           capture_output=True)
            print(f" [node {victim} preempted] ", end="", flush=True)

        killer = threading.Thread(target=preempt_soon, daemon=True)
        killer.start()
        t_kill = time.time()
        for chunk in client.chat.completions.create(model=model, stream=True, max_tokens=48, temperature=0,
                                                    messages=[{"role": "user", "content": prompt}]):
            if chunk.choices and chunk.choices[0].delta.content:
                chunks.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
        print("\n(the stream finished: the gateway moved it to a surviving pair)")
        killer.join(30)
        print("\nwaiting for the controller to fold a replacement node in ...", flush=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            snap = status(name)
            replans = [e for e in snap["events"] if e["kind"] == "replan" and e["ts"] > t_kill]
            if replans:
                break
            time.sleep(1)
        for e in snap["events"]:
            if e["ts"] >= t_kill - 1 and e["kind"] in ("node.preempted", "reschedule", "node.requested",
                                                       "node.ready", "replan", "role_switch", "replica.started"):
                print(f"  +{e['ts'] - t_kill:6.2f}s  {e['kind']:<16} {e['reason'][:90]}")
        tsctl("status", "-d", name)
    finally:
        if args.keep:
            print(f"\nstill running at {dep['gateway_url']} (API key {dep['api_key']}); `tsctl down -d {name}`")
        else:
            tsctl("down", "-d", name)


if __name__ == "__main__":
    main()
