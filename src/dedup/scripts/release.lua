-- Drop this owner's claim so that a later delivery can claim at once; with ARGV[2] = '1'
-- (every POST of the delivery ended) the attempt marker is closed too. Needs
-- close_marker.lua before it. KEYS: the record, the attempt marker. ARGV: the owner, '1'
-- or '0'. Answers 1 when the claim was ours and is gone, else 0.
local v = redis.pcall('GET', KEYS[1])
if v and type(v) ~= 'table' then
  local ok, d = pcall(cjson.decode, v)
  if ok and d.state == 'claimed' and d.owner == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[2] == '1' then close_marker(KEYS[2]) end
    return 1
  end
end
return 0
