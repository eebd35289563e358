-- Mark that a POST is about to be sent. KEYS: the record, the attempt marker. ARGV: the
-- owner, the TTL (ms), the posted parent and name. Answers 1 when marked, 0 when the
-- caller does not hold the claim.
-- Only while the caller holds the claim (so a worker that lost it never posts). The
-- marker is JSON: {count, at (the server's clock, ms), open, posted: [[parent, name], ...]};
-- an older marker (a plain count) or an unreadable one still counts as an attempt.
local g = redis.pcall('GET', KEYS[1])
if type(g) ~= 'string' then return 0 end
local okg, d = pcall(cjson.decode, g)
if not (okg and type(d) == 'table' and d.state == 'claimed' and d.owner == ARGV[1]) then
  return 0
end
local m = {count = 0, posted = {}}
local raw = redis.pcall('GET', KEYS[2])
if type(raw) == 'string' then
  local ok, old = pcall(cjson.decode, raw)
  if ok and type(old) == 'table' then m = old
  elseif ok and type(old) == 'number' then m.count = old
  else m.count = 1 end
elseif type(raw) == 'table' then
  redis.call('DEL', KEYS[2])
  m.count = 1
end
if type(m.posted) ~= 'table' then m.posted = {} end
m.count = (tonumber(m.count) or 0) + 1
local t = redis.call('TIME')
m.at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
m.open = true
local seen = false
for _, p in ipairs(m.posted) do
  if p[1] == ARGV[3] and p[2] == ARGV[4] then seen = true end
end
if not seen then
  table.insert(m.posted, {ARGV[3], ARGV[4]})
  while #m.posted > 5 do table.remove(m.posted, 1) end
end
redis.call('SET', KEYS[2], cjson.encode(m), 'PX', ARGV[2])
return 1
