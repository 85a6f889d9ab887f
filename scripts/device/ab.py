"""Change table between two runs of `lipstream bench engine` (same GPU, same call): a baseline
binary's figures against the current one's.

  python3 ab.py base.json new.json
"""
import json, sys

base, new = (json.load(open(p)) for p in sys.argv[1:3])
print(f"GPU {new['gpu']}: baseline {sys.argv[1]} vs {sys.argv[2]}")
print(f"{'step':<16}{'B':>4}{'base ms':>10}{'new ms':>10}{'change':>9}")
for key, r in new["results"].items():
    old = base["results"].get(key, {})
    for k, v in r.items():
        if not k.endswith("_ms") or k not in old:
            continue
        b = key[1:] if key[1:].isdigit() else "1"
        print(f"{k[:-3]:<16}{b:>4}{old[k]:>10.3f}{v:>10.3f}{(v / old[k] - 1) * 100:>8.1f}%")
print(f"device memory: {base['device_mib']:.0f} -> {new['device_mib']:.0f} MiB")
