-- Release a lock (the login session's refresh lock) only if this owner still holds it.
-- KEYS: the lock. ARGV: the owner. Answers 1 when released, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
