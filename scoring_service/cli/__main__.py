from scoring_service.cli import main

main()
