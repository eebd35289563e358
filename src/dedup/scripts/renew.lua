-- Extend this owner's claim by its lease, only while it is still this owner's.
-- KEYS: the record. ARGV: the owner, the lease (ms). Answers 1 when renewed, else 0.
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' or not v then return 0 end
local ok, d = pcall(cjson.decode, v)
if ok and d.state == 'claimed' and d.owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
