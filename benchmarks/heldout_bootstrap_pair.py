"""Does a model that did not train on a face embed one person's two ids together? (issue 29)

The sweep's missed merges are duplicate pairs the bootstrap model learns apart
(benchmarks/diagnose_missed_merges.py). This trains a bootstrap model on each half of every
identity's stage-1 faces (by row parity) and one on all of them, as `arcface clean-data`'s
first round does, and prints each duplicate pair's underlying-centre angle (clean faces) under
the all-faces model, under each half model on the faces it trained on, and on the faces it
did not; then, per half model, how far clean and mislabelled faces lie from their identity's
centre, trained against held out.

    .venv/bin/python benchmarks/heldout_bootstrap_pair.py SEED LEVEL     # uniform noise, 50x20

Work under /tmp/heldout_bootstrap<SEED> (kept: a rerun reuses the data and models).
Seed 3, 30% (session 13): all-faces model 12.5 deg; half models 18.4/24.0 on their own faces
and 27.6/0.0 on held-out ones - no steadier than the all-faces model.
"""
import dataclasses, sys, json, numpy as np, torch
from pathlib import Path
ROOT = Path('/work/main'); sys.path.insert(0, str(ROOT))
from cleaning.synthetic.demo import generate
from cleaning import rewrite
from cleaning.denoise import angle_deg, true_centre_cos
from dataset.refined import RefinedDataset
from pipelines.config import load_config
from pipelines.stage1_dask import run_stage1
from pipelines.stage2_ray import embedded_faces
from pipelines.clean_data import _bootstrap
from dataset import shards
def main():
    seed, level = int(sys.argv[1]), float(sys.argv[2])
    work = Path(f'/tmp/heldout_bootstrap{seed}')
    cfg = load_config(ROOT / 'configs' / 'demo-train.toml')
    demo = dataclasses.replace(cfg.demo, identities=50, images_per_identity=20, seed=seed, label_noise=level, noise_sources=0)
    if not (work / 'raw').exists():
        generate(work / 'raw', demo, ['vggface2'])
    stage1 = run_stage1(str(work / 'raw'), 'vggface2', RefinedDataset.create(str(work / 'stage1')), cfg.clean)
    stage1 = RefinedDataset.open(str(work / 'stage1'))
    truth = json.loads((work / 'raw' / 'ground_truth.json').read_text())
    from cleaning.synthetic.score import _norm_key
    by_key = {r['key']: r for r in truth['images']}
    # rows in shard order
    tables = [(storage_name, shards.read_table(u, ['key', 'identity', 'label'])) for storage_name, u in
              [(u.rsplit('/', 1)[-1], u) for u in stage1.shard_uris()]]
    ident = np.concatenate([t.column('identity').to_numpy(zero_copy_only=False) for _, t in tables]).astype(str)
    keys = [_norm_key(k) for _, t in tables for k in t.column('key').to_pylist()]
    person = np.array([by_key[k]['true_identity'] for k in keys], str)
    noise = np.array(['label_noise' in by_key[k]['defects'] for k in keys])
    rank = np.zeros(len(ident), int)
    for nm in np.unique(ident):
        r = np.flatnonzero(ident == nm); rank[r] = np.arange(len(r))
    half = rank % 2
    boot = dataclasses.replace(cfg.train, name='bootstrap', storage=str(work / 'runs'), epochs=cfg.denoise.bootstrap_epochs,
                               max_steps=0, registered_model='', eval_every=0, subcentres=cfg.denoise.bootstrap_subcentres)
    id_map = {str(k): int(v) for k, v in stage1.manifest.to_dict()['identity_to_label'].items()}
    models = {}
    for h in (0, 1):
        dst = RefinedDataset.create(str(work / f'half{h}'))
        if not dst.is_complete():
            offsets, at = {}, 0
            for name, t in tables:
                offsets[name] = at; at += t.num_rows
            def decide(name, table, h=h):
                lo = offsets[name]; sel = half[lo:lo + table.num_rows] == h
                labels = np.where(sel, table.column('label').to_numpy(), -1)
                return rewrite.ShardDecision(labels, [None if s else 'holdout/other_half' for s in sel])
            rewrite.rewrite_dataset(stage1, dst, decide, id_map, stage='holdout')
        models[h], _ = _bootstrap(RefinedDataset.open(str(work / f'half{h}')), dataclasses.replace(boot, name=f'half{h}'), cfg,
                                  str(work / f'half{h}.json'))
    models['all'], _ = _bootstrap(stage1, boot, cfg, str(work / 'all.json'))
    emb = {}
    for k, m in models.items():
        e, _ = embedded_faces(stage1, m, cfg.denoise, '')
        emb[k] = np.concatenate([b for _, b in e.embeddings.blocks()])
    def tc(X, Y):
        return float(angle_deg(np.float64(true_centre_cos(torch.from_numpy(X), torch.from_numpy(Y)))))
    for a, b in truth['duplicate_identities']:
        P = person[(ident == a) & ~noise][0]
        ca, cb = (ident == a) & (person == P), (ident == b) & (person == P)
        full = tc(emb['all'][ca], emb['all'][cb])
        # held out: model h judges the faces of the other half
        held = [tc(emb[h][ca & (half != h)], emb[h][cb & (half != h)]) for h in (0, 1)]
        trained = [tc(emb[h][ca & (half == h)], emb[h][cb & (half == h)]) for h in (0, 1)]
        print(f'{a}/{b}: all-faces model {full:.1f} deg; half models on faces they trained on {trained[0]:.1f}/{trained[1]:.1f}; on held-out faces {held[0]:.1f}/{held[1]:.1f}')
    # label noise too: held-out vs trained angle of noise faces to their identity's clean centre
    for k in (0, 1):
        E = emb[k]
        out = []
        for nm in np.unique(ident):
            c = E[(ident == nm) & ~noise & (half == k)].mean(0); c /= np.linalg.norm(c)
            for sel, tag in ((half == k, 'trained'), (half != k, 'held')):
                r = (ident == nm) & sel
                out.append((tag, np.degrees(np.arccos(np.clip(E[r & noise] @ c, -1, 1))), np.degrees(np.arccos(np.clip(E[r & ~noise] @ c, -1, 1)))))
        for tag in ('trained', 'held'):
            nz = np.concatenate([o[1] for o in out if o[0] == tag]); cl = np.concatenate([o[2] for o in out if o[0] == tag])
            print(f'model half{k}, {tag} faces: clean median {np.median(cl):.1f} deg, noise median {np.median(nz):.1f}, noise below the clean 95th pct {np.mean(nz < np.percentile(cl, 95)):.2f}')

if __name__ == '__main__':
    main()
