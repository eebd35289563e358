-- Replace a record this version cannot read by a claim, only if it is still exactly
-- what was seen. KEYS: the record. ARGV[3], ARGV[4]: the claim (JSON) and its lease (ms).
-- ARGV[1] says what was seen: 'value' (ARGV[2] is the exact bytes) or 'type' (ARGV[2] is
-- the type name). Anything else stored meanwhile is left alone.
local t = redis.call('TYPE', KEYS[1]).ok
if ARGV[1] == 'type' then
  if t ~= ARGV[2] then return 0 end
  redis.call('DEL', KEYS[1])
elseif t ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
