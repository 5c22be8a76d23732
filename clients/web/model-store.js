// The model file, downloaded once and kept in the browser's Cache API: a second visit reads it from the cache.
// A cached copy is used as long as the server still describes the same file (a HEAD request: same ETag, or same
// Last-Modified and length); a changed file is downloaded again, and an offline visit uses the cached one.

const CACHE_NAME = "percepiano-models-v1";
const SAME = ["etag", "last-modified", "content-length"];

function sameFile(head, cached) {
  const etag = head.headers.get("etag");
  if (etag && cached.headers.get("etag")) return etag === cached.headers.get("etag");
  return SAME.slice(1).every((h) => head.headers.get(h) === cached.headers.get(h));
}

async function openCache() {
  try {
    return "caches" in self ? await caches.open(CACHE_NAME) : null;
  } catch {
    return null; // an insecure origin or storage turned off: no cache, the model is downloaded each visit
  }
}

// Reads a response's body with progress (bytes so far, total or 0).
async function readBody(res, onProgress) {
  const total = Number(res.headers.get("content-length")) || 0;
  if (!res.body) return new Uint8Array(await res.arrayBuffer());
  const reader = res.body.getReader(), parts = [];
  let got = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    got += value.length;
    onProgress(got, total);
  }
  const bytes = new Uint8Array(got);
  let at = 0;
  for (const p of parts) { bytes.set(p, at); at += p.length; }
  return bytes;
}

// -> {bytes, fromCache, cached (stored for the next visit)}.
export async function loadModel(url, onProgress = () => {}) {
  const where = new URL(url, location.href);
  if (where.origin !== location.origin) throw new Error(`the model must come from this page's origin, not ${where.origin}`);
  const cache = await openCache();
  const cached = cache && await cache.match(where.href);
  if (cached) {
    const head = await fetch(where.href, { method: "HEAD", cache: "no-store" }).catch(() => null);
    if (!head || !head.ok || sameFile(head, cached)) {
      return { bytes: new Uint8Array(await cached.arrayBuffer()), fromCache: true, cached: true };
    }
  }
  const res = await fetch(where.href, { cache: "no-store" });
  if (!res.ok) {
    const body = await res.json().catch(() => null); // the service explains its refusals: {"error": "..."}
    throw new Error(`could not load the model ${where.pathname}: ${(body && body.error) || `HTTP ${res.status}`}`);
  }
  const bytes = await readBody(res, onProgress);
  let stored = false;
  if (cache) {
    const headers = Object.fromEntries(SAME.map((h) => [h, res.headers.get(h)]).filter(([, v]) => v !== null));
    try {
      await cache.put(where.href, new Response(bytes, { headers: { ...headers, "content-type": "application/octet-stream" } }));
      stored = true;
    } catch {
      stored = false; // over the storage quota: scored all the same, downloaded again next time
    }
  }
  return { bytes, fromCache: false, cached: stored };
}
