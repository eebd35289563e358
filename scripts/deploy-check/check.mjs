// Checks that need tools from npm (run by scripts/check-deploy.sh, with this directory's
// pinned packages installed):
// - docs/asyncapi.yaml with the official AsyncAPI parser: no error, and no warning either
//   (it warns when the document is not on the latest AsyncAPI version);
// - the KEDA objects (ScaledObject, TriggerAuthentication) and the PrometheusRule against
//   the schemas generated from their CRDs (@kubernetes-models).
// Usage: node check.mjs <repository root>
import fs from 'node:fs';
import path from 'node:path';
import yaml from 'js-yaml';
import { Parser } from '@asyncapi/parser';
import { ScaledObject, TriggerAuthentication } from '@kubernetes-models/keda/keda.sh/v1alpha1';
import { PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';

const root = process.argv[2];
let failures = 0;
const fail = (what) => {
  console.error(`FAIL ${what}`);
  failures += 1;
};

// AsyncAPI: relative $refs resolve from the document's own directory.
const asyncapi = path.join(root, 'docs/asyncapi.yaml');
const diagnostics = await new Parser().validate(fs.readFileSync(asyncapi, 'utf8'), {
  source: asyncapi,
});
// 0 error, 1 warning, 2 information, 3 hint: errors and warnings fail, and so does the
// advice to move to the latest AsyncAPI version.
const failing = (d) => d.severity <= 1 || d.code === 'asyncapi-latest-version';
for (const d of diagnostics.filter(failing)) {
  fail(`docs/asyncapi.yaml: ${d.code}: ${d.message} at ${d.path.join('.')}`);
}
if (!diagnostics.some(failing)) {
  console.log('ok   docs/asyncapi.yaml (AsyncAPI parser: no error, no warning)');
}

const models = { ScaledObject, TriggerAuthentication, PrometheusRule };
for (const file of ['deploy/kubernetes/keda-scaledobject.yaml', 'deploy/kubernetes/prometheus-rules.yaml']) {
  for (const doc of yaml.loadAll(fs.readFileSync(path.join(root, file), 'utf8'))) {
    const Model = models[doc?.kind];
    if (!Model) {
      fail(`${file}: ${doc?.kind} is not a kind this check knows`);
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`ok   ${file}: ${doc.kind} ${doc.metadata?.name} (its CRD's schema)`);
    } catch (e) {
      fail(`${file}: ${doc.kind} ${doc.metadata?.name}: ${e.message}`);
    }
  }
}
// The check itself: a wrong object must fail.
try {
  new ScaledObject({ metadata: { name: 'x' }, spec: { scaleTargetRef: { name: 'd' }, triggers: [], minReplicaCount: 'two' } }).validate();
  fail('the CRD schemas accepted a ScaledObject with minReplicaCount "two"');
} catch {
  // expected
}
process.exit(failures === 0 ? 0 : 1);
