-- Read-only and in one step, so a report never mixes two moments: for each key its type
-- and, when a string, its value; then the first key's PTTL. (A worker releases a claim
-- and keeps its last outcome a moment later: read one by one, `status` could show the
-- claim of one moment beside the outcome of the next.)
local out = {}
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  out[#out + 1] = kind
  if kind == 'string' then out[#out + 1] = redis.call('GET', key) else out[#out + 1] = false end
end
out[#out + 1] = redis.call('PTTL', KEYS[1])
return out
