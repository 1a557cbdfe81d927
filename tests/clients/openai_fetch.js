// Two OpenAI chat completions with Node.js's built-in `fetch` (undici over Node's TLS: OpenSSL
// through memory BIOs), one non-streamed, one streamed with `stream_options.include_usage`;
// prints what each call got as one JSON list.
//
// Configured only the way an agent's operator would: base URL and key from OPENAI_BASE_URL and
// OPENAI_API_KEY, trust roots from NODE_EXTRA_CA_CERTS. Waits for one line on stdin before the
// first call, so a test can hold the process until its TLS library is probed.
//
// Usage: node openai_fetch.js MODEL
// Output: [{"stream": bool, "id", "content", "usage": {...}, "peer": x-mock-peer}, ...]

const readline = require('readline');

const base = process.env.OPENAI_BASE_URL;
const key = process.env.OPENAI_API_KEY;
const model = process.argv[2];

async function chat(i, stream) {
  const body = { model, max_tokens: 16, messages: [{ role: 'user', content: `Call ${i}: name a colour and a number.` }] };
  if (stream) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  const r = await fetch(`${base}/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body: JSON.stringify(body),
  });
  const text = await r.text();
  if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${text}`);
  const peer = r.headers.get('x-mock-peer');
  if (!stream) {
    const v = JSON.parse(text);
    return { stream, id: v.id, content: v.choices[0].message.content, usage: v.usage, peer };
  }
  let id = null;
  let usage = null;
  let content = '';
  let done = false;
  for (const line of text.split('\n')) {
    if (!line.startsWith('data: ')) continue;
    const data = line.slice(6).trim();
    if (data === '[DONE]') {
      done = true;
      continue;
    }
    const c = JSON.parse(data);
    id = c.id;
    for (const ch of c.choices || []) content += (ch.delta && ch.delta.content) || '';
    if (c.usage) usage = c.usage;
  }
  if (!done) throw new Error(`stream without [DONE]: ${text}`);
  return { stream, id, content, usage, peer };
}

const rl = readline.createInterface({ input: process.stdin });
rl.once('line', async () => {
  rl.close();
  try {
    const out = [await chat(0, false), await chat(1, true)];
    console.log(JSON.stringify(out));
    process.exit(0);
  } catch (e) {
    console.error(String(e && e.stack ? e.stack : e));
    process.exit(1);
  }
});
