"""The local stack the demo and the tests run on. Test infrastructure: plugins/ and dags/ never import it."""
