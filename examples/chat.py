"""Chat with a bundle from Python: `python examples/chat.py my-bundle`."""
import sys

import edgeq

model = edgeq.load(sys.argv[1])
history = []
while (text := input("> ").strip()):
    history.append({"role": "user", "content": text})
    reply = []
    for piece in model.generate(messages=history, stream=True, max_new_tokens=256, temperature=0.7, top_p=0.9, seed=0):
        print(piece, end="", flush=True)
        reply.append(piece)
    print()
    history.append({"role": "assistant", "content": "".join(reply)})
