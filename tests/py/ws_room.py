"""A verifying chat client for hf-chat's /ws/{room}, on the `websockets`
library.

Members join one room (all joined before anyone speaks), then each sends
its messages; every member must receive every message exactly once, in seq
order 1..N, all members must see the same log, and no connection may close
before the end. Options add fragmented messages, pings between them, a
large request head, and TLS (wss://, the server verified against a CA). Prints "ok ..." and exits 0, or raises.
"""
import argparse
import asyncio
import json
import ssl

from websockets.asyncio.client import connect


async def main(a):
    scheme, kw = "ws", {}
    if a.tls:
        scheme, kw = "wss", {"ssl": ssl.create_default_context(cafile=a.tls)}
    url = f"{scheme}://{a.addr}/ws/{a.room}?name="
    headers = {"Cookie": "c=" + "x" * a.cookie} if a.cookie else None
    if a.small_head:
        # No extension offer, no User-Agent: a head of under 200 bytes.
        kw.update(compression=None, user_agent_header=None)
    socks = [
        await connect(url + f"m{i}", ping_interval=None, open_timeout=20,
                      close_timeout=5, additional_headers=headers, **kw)
        for i in range(a.members)
    ]
    total = a.members * a.per

    async def run(i, ws):
        got = []

        async def sender():
            for k in range(a.per):
                text = f"m{i}-{k}-" + "y" * (k % 7)
                if a.fragment and k % 3 == 1:
                    # Three fragments of one message.
                    third = max(1, len(text) // 3)
                    await ws.send([text[:third], text[third:2 * third], text[2 * third:]])
                else:
                    await ws.send(text)
                if a.ping and k % 4 == 0:
                    pong = await ws.ping(f"p{i}-{k}".encode())
                    await asyncio.wait_for(pong, 30)
                await asyncio.sleep(a.gap)

        st = asyncio.create_task(sender())
        while len(got) < total:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        await st
        return got

    results = await asyncio.gather(*(run(i, ws) for i, ws in enumerate(socks)))
    sent = sorted(f"m{i}-{k}-" + "y" * (k % 7) for i in range(a.members) for k in range(a.per))
    for i, got in enumerate(results):
        seqs = [m["seq"] for m in got]
        assert seqs == list(range(1, total + 1)), f"member {i}: seqs {seqs}"
        texts = sorted(m["text"] for m in got)
        assert texts == sent, f"member {i}: {len(texts)} texts, {len(set(texts))} distinct, want {len(sent)}"
        for m in got:
            assert m["text"].startswith(m["from"] + "-"), m
    contents = {tuple((m["seq"], m["from"], m["text"]) for m in g) for g in results}
    assert len(contents) == 1, "members disagree on the log"
    # A member joining now with since=0 gets the whole log, the same.
    async with connect(url + "late&since=0", ping_interval=None, open_timeout=20, **kw) as late:
        history = [json.loads(await asyncio.wait_for(late.recv(), 30)) for _ in range(total)]
    assert tuple((m["seq"], m["from"], m["text"]) for m in history) in contents, "history differs"
    for ws in socks:
        await ws.close()
    print(f"ok members={a.members} messages={total}")


p = argparse.ArgumentParser()
p.add_argument("addr")
p.add_argument("--room", default="lobby")
p.add_argument("--members", type=int, default=4)
p.add_argument("--per", type=int, default=40)
p.add_argument("--gap", type=float, default=0.02)
p.add_argument("--fragment", action="store_true")
p.add_argument("--ping", action="store_true")
p.add_argument("--cookie", type=int, default=0)
p.add_argument("--small-head", action="store_true")
p.add_argument("--tls", metavar="CAFILE", help="wss://, verifying the server against CAFILE")
asyncio.run(main(p.parse_args()))
