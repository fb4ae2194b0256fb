"""An Ollama simulator: Ollama's HTTP API without a GPU, for tests, demos and benchmarks.

It serves what a client of Ollama sees, so the official `ollama`, `openai` and `anthropic`
SDKs, LiteLLM's `ollama/` and `ollama_chat/` providers and langchain-ollama work against it
unchanged. It says it is Ollama 0.6.0 and answers as 0.6 does where 0.6 had the endpoint;
what came later (`/v1/responses`, `/v1/messages`, base64 embeddings on `/v1/embeddings`)
answers as Ollama's current source does (server/routes.go, openai/, middleware/,
anthropic/):

- native API: `POST /api/generate`, `POST /api/chat` (NDJSON stream by default, one JSON
  object with `"stream": false`), `POST /api/embed`, `POST /api/embeddings` (never streamed),
  `GET|HEAD /api/tags`, `GET /api/ps`, `GET|HEAD /api/version`, `POST /api/show`,
  `GET|HEAD /` ("Ollama is running");
- model management: `POST /api/pull`, `POST /api/push`, `POST /api/create` (NDJSON progress
  by default, only the last status with `"stream": false`), `POST /api/copy`,
  `DELETE /api/delete`, `HEAD|POST /api/blobs/{digest}`; they change this instance's model
  list (a pulled or created model is listed and can be used at once);
- OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions`,
  `POST /v1/responses` (JSON, or SSE with `"stream": true`; chat and completions honour
  `stream_options.include_usage`), `POST /v1/embeddings` (`encoding_format` float or base64),
  `GET /v1/models`, `GET /v1/models/{model}`;
- Anthropic-compatible API: `POST /v1/messages` (JSON, or the SSE events `message_start`,
  `content_block_start`, `content_block_delta`, `content_block_stop`, `message_delta`,
  `message_stop` with `"stream": true`);
- Ollama's error bodies: `{"error": "..."}` on the native API; `{"error": {"message", "type",
  "param", "code"}}` on /v1, with type `invalid_request_error` for what the OpenAI layer
  rejects itself and `api_error` for errors passed on from the native handlers (as 0.6 does)
  on chat, completions, embeddings and models, and a type that follows the status on
  /v1/responses (as Ollama's current source does); Anthropic's `{"type": "error", "error":
  {"type", "message"}, "request_id"}` on /v1/messages; Gin's `404 page not found` for an
  unknown path and `405 method not allowed` for a known path with another method.

Like Ollama, at most `parallel` requests generate or embed at once (OLLAMA_NUM_PARALLEL); the
others wait in FIFO order for a slot without an answer (not even headers), and a client that
goes away stops its request at once, whether it waits for its model, for a slot, streams, or
waits for a whole reply.

Models load as Ollama's scheduler (server/sched.go) loads them: a request for a loaded model
goes straight on to wait for a slot; the others queue, in order, for the one loader, which
loads one model at a time (`load_time_s` x the model's size / the size of a 3.2B model, so
0 by default) after making room: when `max_loaded` models are loaded it unloads an idle one
(no request on it), and when none is idle it waits until one is, while requests for the
loaded models go on. Every request for a model that is waiting or loading joins that load.
A model stays loaded until `keep_alive` (5 minutes unless the request names one; 0 unloads it
once idle, a negative value keeps it) after its last request ended; `/api/ps` lists exactly
the loaded models and, as Ollama's does, the one loading. `load_duration` is the time a
request spent waiting for its model to be loaded (the wait for a slot, as in Ollama, is in
`total_duration` only).

A performance model (`performance`), off by default, makes it behave like a GPU under load:
past a knee of `knee` generations at once each token takes longer (`token_delay_s` x n /
`knee`), so total tokens/s stops rising there; a prompt takes `prompt_token_s` per token
not already in the prompt cache of the free slot it takes (each slot keeps its last prompt
and reply, as llama.cpp's and Ollama's do); past `max_generations` at once a request
answers 503 out of memory. `prompt_eval_duration`, `eval_duration` and `load_duration`
report those times. `--calibrated` starts it with the parameters measured on llama.cpp's
`llama-server` (`python -m bench engine-curve`, BENCHMARKS.md).

Its own control API lives under `/sim/`: `GET /sim/stats` (counters and config: inference
requests by outcome, `max_in_flight`, `loads` and `loads_by_model`, `evictions`, prompt
tokens cached and processed, `out_of_memory`; metadata and model management are not
counted), `POST /sim/reset` (zero the counters), `PUT /sim/config` (change `tokens`,
`token_delay_s`, `parallel`, `fail_mode`, `load_time_s`, `max_loaded`, `knee`,
`prompt_token_s`, `max_generations` live), `GET /sim/performance` (the performance model's
parameters, the contention now, and each slot's cached tokens).

Where it differs from Ollama:

- the reply is not a model's: `tokens` words (fewer if `num_predict`/`max_tokens`/
  `max_output_tokens` caps it) chosen by a hash of (model, prompt or messages), so the same
  prompt or conversation always gets the same text, whichever API carries it; each token
  takes `token_delay_s`; token counts are words, not a tokenizer's;
- embeddings are not a model's either: a hash of (model, input) seeds 384 float32s,
  L2-normalised, on every embedding endpoint (Ollama's /api/embeddings returns the model's
  vector unnormalised); each input takes `token_delay_s` and counts its words (at least 1);
- nothing is read from disk or from a registry: sizes, digests, layers and load times are
  made up; every valid name can be pulled, at once; pushing a model it has always succeeds;
  `create` takes `from` (pulled first if unknown, as Ollama does) or `files` naming blobs
  uploaded here, and ignores `quantize` and `adapters`; models whose name says `embed`,
  `minilm` or `bge-` are embedding models (they cannot generate or chat);
- `parallel` caps the whole instance, not each loaded model; `max_loaded` 0 means no limit
  (Ollama's 0 means 3 per GPU); the idle model unloaded to make room is the least recently
  used (Ollama's scheduler picks by keep-alive, then by path, and when none is idle waits
  for the first in that order, not for any); the next load begins once the last one is done
  (Ollama's may start making room meanwhile); a load that has started finishes even if
  every request for it went away;
- the `message_start` event of /v1/messages carries the real input token count (Ollama's
  carries an estimate, a quarter of the characters);
- an unknown model gets `model "x" not found, try pulling it first` (404) on every inference
  endpoint (Ollama's /api/generate says `model 'x' not found`), and a missing model gets
  `model is required` (400) on every one (Ollama's /api/generate and current /api/embed
  answer 404);
- JSON syntax error texts only imitate Go's; images, tools, `format`, `think` and options
  other than `num_predict` are accepted and ignored;
- `fail_mode` "error500" answers 500 `{"error": "simulated failure"}` (in each API's error
  shape), "error503" Ollama's 503 past its queue, "oom" Ollama's 500 for a model that does
  not fit in memory, "hang" never answers; all only after the request was validated, and
  only on the inference endpoints.

The package, one module a seam:

- `config`: SimConfig and its live changes; `stats`: the counters; `slots`: the parallel slots;
  `performance`: how long prompts and tokens take under load, and the slots' prompt caches;
- `names`, `models`: model names, and the models this instance has; `residency`: which are
  loaded (the scheduler);
- `golang`: how Go reads and writes values; `apis`: the nine APIs and their error bodies;
  `messages`, `requests`: request parsing; `content`: the reply's words and embeddings;
- `answers`, `streams`: the reply formats, whole and streamed;
- `asgi`: the HTTP plumbing; `simulator`: the state every route shares; `inference`: one
  inference request, from its body to its last byte; `management`: pull, push, create, copy,
  delete, blobs; `app`: the routes; `cli`: the command line.
"""

from gpugate.sim.cli import main
from gpugate.sim.slots import SlotGate
from gpugate.sim.stats import Stats

__all__ = ["SlotGate", "Stats", "main"]
