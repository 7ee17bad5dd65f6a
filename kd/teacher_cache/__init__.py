"""Offline teacher: its top-k logits at every masked position, computed once, read back in training.

`cache_teacher.py` runs the teacher over the training blocks (`teacher_cache.epochs` mask draws)
and the validation blocks (the eval masks), and stores per block, at each masked position, the
teacher's top-k token ids and log-probabilities and the log-sum-exp over the full vocabulary.
`ddp_main.py ... teacher_cache.path=<dir>` then distils from these rows without a teacher in
memory (one named by teacher.name is loaded only for a teacher_layers init, then freed).

Masks. Row (split, draw c, block b) was computed on `mask_block(block b, spec, epoch=c,
block_index=b)`: the run's own masking code, seed data.mask_seed, static=False. In training,
epoch E masks with draw c = E mod epochs and looks rows up by the block indices the batch carries,
never by iteration order, so shuffling, DDP and resume cannot misalign them; every row also keeps
its masked positions, which are checked against the batch's. Validation rows use draw 0, which is
what the (static) eval masks are.

Layout of a cache folder:
    manifest.json                  what the cache was made from (teacher weights sha256, tokenizer,
                                   seq_len, token blocks sha256, masking, k, T) and the size and
                                   sha256 of every shard; "complete": true once all shards exist;
                                   "seal": the sha256 of all that (kd/integrity.py), checked on read
    shards/<split>-e<c>-<i>.npy    blocks [i*S, (i+1)*S) of a split, one structured row per block,
                                   read memory-mapped
    shards/<...>.npy.json          the shard's size and sha256, written after it: a shard without one
                                   is partial and gets rewritten when generation resumes
    verified.json                  size, mtime and inode of shards whose sha256 was checked
    tokenizer/                     the teacher's tokenizer (the run's default when no other is named)

Row of a shard (P masked positions per block, K = teacher_cache.topk; 4K + 6 bytes per position):
    lse        float32 (P,)    logsumexp(z / T) over the full vocabulary
    positions  uint16  (P,)    the masked positions
    ids        uint16  (P, K)  the top-k token ids, most likely first (uint32 if the vocab needs it)
    logprobs   float16 (P, K)  log_softmax(z / T) at those ids
T is loss.temperature when the cache was made (manifest "temperature"); the untempered teacher
logits are z = T * (logprobs + lse).

Why log-probabilities rather than raw logits in fp16: the same bytes, but fp16's error grows with
magnitude and the log-probs of likely tokens sit near 0, where fp16 is finest. Raw logits of 10-30
carry errors up to ~0.01, i.e. ~1% on every probability, which would drown the teacher's tail mass
1 - sum(top-k) that lse_tail needs. lse stays float32 because it is added back to every value.

Temperature. loss.topk_mode=renormalize works at any loss.temperature: a softmax over the k ids
needs only their logits. lse_tail needs logsumexp(z / T') over the whole vocabulary, which the
cache holds at its own T only, so it requires loss.temperature == T (make the cache with
loss.temperature=T' on the cache_teacher.py command line for another T').

Verification. Every load checks that all shards exist with their recorded sizes. A shard's sha256
is checked once, by the generation or on the first load (split across ranks), and recorded in
verified.json with its size, mtime and inode; later loads re-hash only shards whose stat changed
(a copy, an edit, a rewrite). teacher_cache.verify=always re-hashes every shard on every load.
The folder must be on a filesystem that every rank sees, for writing and for reading.

Modules: format.py (rows, fingerprints, manifest, verified shards), read.py (TeacherCache and the
training collate), generate.py (cache_teacher.py's generation).
"""
