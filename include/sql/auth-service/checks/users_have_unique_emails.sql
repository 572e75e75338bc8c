-- Every e-mail belongs to at most one account (case-insensitive). Passes when it returns no row.
SELECT lower(email) AS email, count(*) AS accounts FROM users GROUP BY lower(email) HAVING count(*) > 1;
