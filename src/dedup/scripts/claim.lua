-- Claim-or-read an ext id, in one step.
-- KEYS: the record, the last outcome, the attempt marker.
-- ARGV: the claim (JSON), its lease (ms), this delivery as a duplicate's last outcome
-- (JSON), the TTL of marks and outcomes (ms), '1' to mark the first POST now, the posted
-- parent and name.
-- Answers:
-- - {'acquired', marked, marker, now}: claimed now; `marker` is the attempt marker found
--   (any bytes; '\0unreadable' for a key of another type; nil for none) and `now` the
--   server's clock. With ARGV[5] = '1' and no marker, the posting ARGV[6]/ARGV[7] is
--   marked as about to be sent, as mark_attempt.lua would (`marked` = 1): the happy path's
--   first POST needs no round trip of its own;
-- - {'found', value}: the value stored (any bytes). A created record makes ARGV[3] (this
--   delivery as a duplicate, with the record's org_unit_id) the last outcome; the prefix
--   test is enough because the record is only ever written by this program, and a miss
--   costs only that report;
-- - {'type', t} for a key of another type (unreadable: the store never fails on it).
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local raw = redis.pcall('GET', KEYS[3])
  if type(raw) == 'table' then return {'acquired', 0, '\0unreadable', now} end
  if raw then return {'acquired', 0, raw, now} end
  if ARGV[5] == '1' then
    local m = {count = 1, at = now, open = true, posted = {{ARGV[6], ARGV[7]}}}
    redis.call('SET', KEYS[3], cjson.encode(m), 'PX', ARGV[4])
    return {'acquired', 1, false, now}
  end
  return {'acquired', 0, false, now}
end
if t ~= 'string' then return {'type', t} end
local v = redis.call('GET', KEYS[1])
if string.sub(v, 1, 19) == '{"state":"created",' then
  -- The duplicate names the group: its id from the record (the first "org_unit_id", a
  -- field name, never inside a JSON string where quotes are escaped).
  local dup = ARGV[3]
  local id = string.match(v, '"org_unit_id":(%-?%d+)')
  if id then dup = (string.gsub(dup, '"org_unit_id":null', '"org_unit_id":' .. id, 1)) end
  redis.call('SET', KEYS[2], dup, 'PX', ARGV[4])
end
return {'found', v}
