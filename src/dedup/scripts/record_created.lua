-- Record a created group, only while this owner holds the claim (a claim taken over
-- meanwhile is fenced off), closing the attempt marker and keeping the last outcome.
-- Needs close_marker.lua before it. KEYS: the record, the attempt marker, the last
-- outcome. ARGV: the owner, the record (JSON), the TTL (ms), the last outcome (JSON).
-- Answers 'ok'; the created record already there (the caller reports what exists);
-- or 'fenced'.
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then return 'fenced' end
if v then
  local ok, d = pcall(cjson.decode, v)
  if ok and d.state == 'created' then return v end
  if not (ok and d.state == 'claimed' and d.owner == ARGV[1]) then return 'fenced' end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
close_marker(KEYS[2])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
return 'ok'
