// Swaps the faces of a photo through a facetwin server from Node.js, with nothing but the .proto and the official
// gRPC packages: list the models, swap one photo (a whole frame: the server finds, swaps and pastes the faces),
// then send the same photo as a few frames of one SwapStream and read the answers in order.
//
//   npm install
//   node swap.mjs --address localhost:50051 --model real --target cap photo.jpg swapped.png
//   node swap.mjs ... --token "$TOKEN" --ca ca.pem          # a server with TLS and bearer tokens
//
// Any language with gRPC does the same: generate or load facetwin/v1/facetwin.proto and call facetwin.v1.FaceSwap.

import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    address: { type: "string", default: "localhost:50051" },
    model: { type: "string" },
    target: { type: "string" },
    token: { type: "string" },
    ca: { type: "string" },
    frames: { type: "string", default: "3" },
    proto: { type: "string", default: join(here, "..", "..", "proto", "facetwin", "v1", "facetwin.proto") },
  },
});
if (positionals.length !== 2 || !flags.model || !flags.target) {
  console.error("usage: node swap.mjs --model MODEL --target TARGET [--address HOST:PORT] [--token T] [--ca CA.pem] IN OUT.png");
  process.exit(2);
}
const [input, output] = positionals;

// keepCase: the proto's own field names; enums as their names; 64-bit ids as strings.
const definition = protoLoader.loadSync(flags.proto, { keepCase: true, enums: String, longs: String, defaults: true });
const { FaceSwap } = grpc.loadPackageDefinition(definition).facetwin.v1;

// TLS when a CA is given; a token then travels as call credentials (gRPC sends those over TLS only). A token to a
// plaintext server on this host goes as plain metadata.
let credentials = flags.ca ? grpc.credentials.createSsl(readFileSync(flags.ca)) : grpc.credentials.createInsecure();
const metadata = new grpc.Metadata();
if (flags.token && flags.ca) {
  credentials = grpc.credentials.combineChannelCredentials(credentials,
    grpc.credentials.createFromMetadataGenerator((_, done) => {
      const auth = new grpc.Metadata();
      auth.set("authorization", `Bearer ${flags.token}`);
      done(null, auth);
    }));
} else if (flags.token) {
  metadata.set("authorization", `Bearer ${flags.token}`);
}
const client = new FaceSwap(flags.address, credentials);
const deadline = () => new Date(Date.now() + 60_000);
const unary = (method, request) => new Promise((resolve, reject) =>
  client[method](request, metadata, { deadline: deadline() }, (error, reply) => (error ? reject(error) : resolve(reply))));

function request(frameId) {
  return {
    model: flags.model,
    target: flags.target,
    image: { encoded: readFileSync(input) },  // JPEG or PNG bytes as they are; the server decodes them
    kind: "IMAGE_KIND_FULL_FRAME",
    faces: "FACE_SELECTION_LARGEST",
    output_encoding: "ENCODING_PNG",
    frame_id: frameId,
  };
}

async function main() {
  const { models } = await unary("ListModels", {});
  console.log(`models: ${models.map((m) => `${m.name} [${m.identities.join(", ")}] ${m.status}`).join("; ")}`);

  const reply = await unary("Swap", request(0));
  writeFileSync(output, reply.image.encoded);
  const faces = reply.faces.map((f) => `${f.action} to ${f.target}`).join(", ") || "none";
  console.log(`swap: wrote ${output} (${reply.image.encoded.length} bytes); faces: ${faces}; ` +
    `${reply.timings.total_ms.toFixed(1)} ms on the server; synthetic=${reply.provenance.synthetic} ` +
    `manifest ${reply.provenance.manifest_sha256.slice(0, 12)}; request ${reply.request_id}`);

  // One stream: frames go out as fast as gRPC's flow control lets them and come back in order, each with its id.
  const count = Number(flags.frames);
  const stream = client.SwapStream(metadata, { deadline: deadline() });
  const answered = [];
  const done = new Promise((resolve, reject) => {
    stream.on("data", (answer) => answered.push(`${answer.response.frame_id}:${answer.status}` +
      (answer.error ? `(${answer.error.code_name}: ${answer.error.message})` : "")));
    stream.on("end", resolve);
    stream.on("error", reject);
  });
  for (let id = 0; id < count; id++) {
    stream.write({ request: request(id) });
  }
  stream.end();
  await done;
  console.log(`stream: ${answered.join(" ")}`);
}

main().then(() => client.close(), (error) => {
  // A gRPC error carries its status code and the server's message, which says what to change.
  console.error(`error: ${grpc.status[error.code] ?? error.code}: ${error.details ?? error.message}`);
  client.close();
  process.exit(1);
});
