// llama.cpp's side of bench/llama_cpp.py: reads its reference JSON (argv[2]), prints one JSON report.
// Runs llama.cpp through node-llama-cpp's prebuilt CPU binary: one thread, f32 KV cache, no flash attention.
import fs from "node:fs";
import {getLlama} from "node-llama-cpp";

const ref = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const contextOptions = {contextSize: 2 * ref.context, batchSize: 2 * ref.context, threads: 1, flashAttention: false,
  experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"};
// Probabilities of every token, untouched by any sampling filter.
const plain = {temperature: 1, topK: 0, topP: 1, minP: 0};
const report = {};
for (const [name, entry] of Object.entries(ref.models)) {
  for (const [dtype, path] of Object.entries(entry.gguf)) {
    const model = await llama.loadModel({modelPath: path});
    const r = {texts: ref.texts.length, same_ids: 0, same_text_back: 0, differing_texts: [], positions: 0, same_argmax: 0,
      max_prob_diff: 0, max_logprob_diff: 0, greedy_runs: 0, same_greedy: 0};
    ref.texts.forEach((text, i) => {
      const ids = model.tokenize(text, false);
      if (JSON.stringify(ids) === JSON.stringify(entry.ids[i])) r.same_ids++;
      else r.differing_texts.push(text);
      if (model.detokenize(ids, false) === text) r.same_text_back++;
    });
    for (const ids of entry.windows) {
      const ctx = await model.createContext(contextOptions);
      const out = await ctx.getSequence().controlledEvaluate(ids.map((t) => [t, {generateNext: {probabilities: true, options: plain}}]));
      ids.forEach((_, j) => {
        const expected = entry.probs[r.positions];
        const probs = out[j].next.probabilities;
        let best = 0;
        for (let t = 0; t < expected.length; t++) {
          const p = probs.get(t) ?? 0;
          r.max_prob_diff = Math.max(r.max_prob_diff, Math.abs(p - expected[t]));
          if (expected[t] > 1e-4) r.max_logprob_diff = Math.max(r.max_logprob_diff, Math.abs(Math.log(p) - Math.log(expected[t])));
          if (p > (probs.get(best) ?? 0)) best = t;
        }
        if (best === expected.indexOf(Math.max(...expected))) r.same_argmax++;
        r.positions++;
      });
      await ctx.dispose();
    }
    for (const g of entry.greedy) {
      const ctx = await model.createContext(contextOptions);
      const got = [];
      for await (const t of ctx.getSequence().evaluate(g.prompt, {temperature: 0})) {
        got.push(t);
        if (got.length >= g.tokens.length) break;
      }
      r.greedy_runs++;
      if (JSON.stringify(got) === JSON.stringify(g.tokens)) r.same_greedy++;
      await ctx.dispose();
    }
    report[`${name}/${dtype}`] = r;
    await model.dispose();
  }
}
console.log(JSON.stringify(report));
process.exit(0);
