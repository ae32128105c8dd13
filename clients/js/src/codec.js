// The MessagePack codec, loaded on first use.

/** @msgpack/msgpack, loaded on first use: a page that speaks JSON never needs it. */
let msgpackModule = null;
export async function loadMsgpack() {
  try {
    msgpackModule ??= await import("@msgpack/msgpack");
  } catch (error) {
    throw new TypeError("gavel-client: format 'msgpack' needs the @msgpack/msgpack package "
      + `(in a browser, map it in an import map), or use format 'json' (${error})`);
  }
  return msgpackModule;
}
